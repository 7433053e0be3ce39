"""A folder's run records as the report and compare see them: read and checked
(`results.load_runs`: a bad file is skipped and named, never fatal), speedup and efficiency
derived against the folder's baseline (`scaling.derive`), in reading order."""

from pathlib import Path

from gptbench import results, scaling
from gptbench.config import STRATEGIES
from gptbench.results import value_at

# The order configurations are read in: more ranks last, simplest strategy first (the
# config's own order of strategies).
STRATEGY_ORDER = STRATEGIES


def load_runs(suite_dir) -> tuple[list[dict], list[tuple[Path, str]]]:
    """(records with derived figures, sorted by run_order; [(path, reason)] of skipped files)."""
    from gptbench.report.emulated import split

    records, skipped = results.load_runs(suite_dir)
    measured, emulated = split(records)  # emulated rows take no part in speedups
    return (sorted(scaling.derive(measured), key=run_order)
            + sorted(emulated, key=run_order)), skipped


def run_order(record: dict) -> tuple:
    """Sort key: (world_size, strategy in STRATEGY_ORDER, run_id); unknown values sort last."""
    world_size = value_at(record, "topology.world_size")
    strategy = record.get("strategy")
    strategy_rank = STRATEGY_ORDER.index(strategy) if strategy in STRATEGY_ORDER else len(STRATEGY_ORDER)
    return (world_size if isinstance(world_size, int) else 1 << 30, strategy_rank, record["run_id"])
