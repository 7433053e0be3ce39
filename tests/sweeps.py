"""Real multi-process runs for the tests: the runs of one rank count share one launch
(`launch/run.py --sweep`), since process start-up dominates on 2 cores."""
import subprocess

import yaml

from gptbench import launcher, results


def run_sweeps(out, config: str, runs: dict, common: list[str], timeout_s: int) -> dict:
    """Run `runs` ({run_id: (ranks, {key: value})}) with `common` overrides under `out`;
    return {run_id: record or None}. Each launch's output is in out/sweep<ranks>.log."""
    for ranks in sorted({r for r, _ in runs.values()}):
        variants = [{"run_id": run_id, **sets} for run_id, (r, sets) in runs.items() if r == ranks]
        sweep = out / f"sweep{ranks}.yaml"
        sweep.write_text(yaml.safe_dump({"runs": variants}), encoding="utf-8")
        cmd = launcher.deepspeed_command(config, common + [f"output_dir={out}"], ranks)
        with open(out / f"sweep{ranks}.log", "w") as log:
            subprocess.run(cmd + ["--sweep", str(sweep)], stdout=log, stderr=subprocess.STDOUT,
                           timeout=timeout_s, check=False)
    return {run_id: results.read_record(results.run_path(str(out), run_id)) for run_id in runs}
