"""Test helper: change one record of a suite folder in place."""
import json
from pathlib import Path


def edit_run(suite_dir: Path, run_id: str, edit) -> Path:
    """Apply `edit(record)` to runs/<run_id>.json of `suite_dir`; return the file's path."""
    path = suite_dir / "runs" / f"{run_id}.json"
    record = json.loads(path.read_text())
    edit(record)
    path.write_text(json.dumps(record))
    return path
