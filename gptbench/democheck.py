"""Did `make demo` do its job? Every configuration of the suite that can be formed must be
recorded `ok` with parity passed; the others `not_applicable`. CI runs this after
`make demo`:

    python -m gptbench.democheck [SUITE_YAML] [OUTPUT_DIR]

Prints one line per problem and exits 1, or a one-line summary and exits 0.
"""
from __future__ import annotations

import sys

from gptbench import launcher, results
from gptbench.errors import UserError
from gptbench.suite import load_suite

SUITE = "deepspeed_configs/demo-cpu.yaml"


def check(suite_path: str, output_dir: str | None = None) -> tuple[list[str], dict]:
    """(problems, count of each expected status) for the suite's records."""
    suite = load_suite(suite_path, output_dir)
    problems, counts = [], {}
    for run in suite.runs:
        expected = ("not_applicable"
                    if launcher.prepare(suite.base, list(run.overrides), run.ranks).not_applicable
                    else "ok")
        counts[expected] = counts.get(expected, 0) + 1
        path = results.run_path(suite.output_dir, run.run_id)
        record = results.read_record(path)
        if record is None:
            problems.append(f"{run.run_id}: no readable record at {path}")
        elif record["status"] != expected:
            problems.append(f"{run.run_id}: {record['status']} where {expected} was expected: "
                            f"{record.get('error')}")
        elif expected == "ok" and (record.get("parity") or {}).get("passed") is not True:
            parity = record.get("parity") or {}
            problems.append(f"{run.run_id}: parity not passed (tokens_match "
                            f"{parity.get('tokens_match')}, max |dlogit| "
                            f"{parity.get('max_abs_logit_diff')}, tolerance "
                            f"{parity.get('tolerance')})")
    return problems, counts


def main(argv=None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    suite_path = args[0] if args else SUITE
    try:
        problems, counts = check(suite_path, args[1] if len(args) > 1 else None)
    except UserError as e:
        print(f"democheck: error: {e}", file=sys.stderr)
        return 2
    for line in problems:
        print(f"democheck: {line}", file=sys.stderr)
    if problems:
        return 1
    print(f"democheck: {suite_path}: {counts.get('ok', 0)} ok with parity passed, "
          f"{counts.get('not_applicable', 0)} not applicable, as expected")
    return 0


if __name__ == "__main__":
    sys.exit(main())
