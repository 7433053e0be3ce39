"""Read a suite's run records. A file that is not a run record is skipped and named, never
fatal: one bad file must not hide the other configurations of a suite."""

import json
from pathlib import Path

from gptbench.errors import UserError
from gptbench.results import SCHEMA as RUN_SCHEMA
from gptbench.results import STATUSES
# The order configurations are read in: more ranks last, simplest strategy first.
STRATEGY_ORDER = ("pure_data_parallel", "tensor_data_hybrid", "pipeline_data_hybrid", "full_model_parallel")


def read_run(path: Path) -> dict:
    """The run record in `path`; ValueError with a one-line reason when it is not one."""
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not valid JSON: {exc}") from exc
    schema = record.get("schema") if isinstance(record, dict) else None
    if schema != RUN_SCHEMA:
        raise ValueError(f"schema is {schema!r}, not {RUN_SCHEMA!r}")
    if not isinstance(record.get("run_id"), str) or record.get("status") not in STATUSES:
        raise ValueError(f"run_id missing or status not one of {', '.join(STATUSES)}")
    return record


def load_runs(suite_dir) -> tuple[list[dict], list[tuple[Path, str]]]:
    """(records sorted by run_order, [(path, reason)] of the files skipped) from suite_dir/runs."""
    runs_dir = Path(suite_dir) / "runs"
    if not runs_dir.is_dir():
        raise UserError(f"{runs_dir} is not a directory: a suite keeps its run records in runs/")
    records, skipped, seen_ids = [], [], set()
    for path in sorted(runs_dir.glob("*.json")):
        try:
            record = read_run(path)
        except ValueError as exc:
            skipped.append((path, str(exc)))
            continue
        if record["run_id"] in seen_ids:
            # compare matches runs by run_id, so a second record of one id would be ambiguous.
            skipped.append((path, f"duplicate run_id {record['run_id']!r}"))
            continue
        seen_ids.add(record["run_id"])
        records.append(record)
    return sorted(records, key=run_order), skipped


def run_order(record: dict) -> tuple:
    """Sort key: (world_size, strategy in STRATEGY_ORDER, run_id); unknown values sort last."""
    world_size = value_at(record, "topology.world_size")
    strategy = record.get("strategy")
    strategy_rank = STRATEGY_ORDER.index(strategy) if strategy in STRATEGY_ORDER else len(STRATEGY_ORDER)
    return (world_size if isinstance(world_size, int) else 1 << 30, strategy_rank, record["run_id"])


def value_at(record: dict, dotted_path: str):
    """record["a"]["b"]... for "a.b...", or None where a step is missing or null: failed runs
    hold null sections (metrics, parity) as well as null leaves."""
    value = record
    for key in dotted_path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value
