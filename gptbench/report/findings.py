"""Findings of a suite, computed from its run records, never written by hand: the best
configuration, where scaling is lost and what the records say it was lost to (the time
breakdown of a profiled batch, ranks crowding too few CPU cores), parity breaks, graph breaks."""

from gptbench.results import value_at

# Below this parallel efficiency a configuration "loses scaling" and the report says why.
EFFICIENCY_LOSS_BELOW = 0.8
# Above this parallel efficiency a speedup is more than linear: suspect the measurement.
SUPERLINEAR_ABOVE = 1.1
# A share of the profiled batch large enough to name as a cause of the loss.
CAUSE_SHARE_ABOVE = 0.1
BREAKDOWN_PARTS = ("communication", "waiting", "compute")


def with_throughput(records: list[dict]) -> list[dict]:
    return [r for r in records if r["status"] == "ok" and value_at(r, "metrics.throughput_tokens_per_s") is not None]


def best_by_throughput(records: list[dict]) -> dict | None:
    runs = with_throughput(records)
    return max(runs, key=lambda r: r["metrics"]["throughput_tokens_per_s"]) if runs else None


def scaling_losses(records: list[dict]) -> list[dict]:
    """Multi-rank ok runs whose parallel efficiency is below EFFICIENCY_LOSS_BELOW."""
    return [r for r in records if r["status"] == "ok" and (value_at(r, "topology.world_size") or 1) > 1
            and value_at(r, "metrics.parallel_efficiency") is not None
            and r["metrics"]["parallel_efficiency"] < EFFICIENCY_LOSS_BELOW]


def superlinear(records: list[dict]) -> list[dict]:
    return [r for r in records if r["status"] == "ok" and (value_at(r, "topology.world_size") or 1) > 1
            and (value_at(r, "metrics.parallel_efficiency") or 0) > SUPERLINEAR_ABOVE]


def superlinear_sentence(records: list[dict]) -> list[str]:
    runs = superlinear(records)
    if not runs:
        return []
    listed = ", ".join(f"{r['run_id']} {r['metrics']['parallel_efficiency']:.0%}" for r in runs)
    baselines = sorted({value_at(r, "metrics.baseline_run_id") for r in runs})
    return [f"More than linear speedup ({listed}): usually the baseline ({', '.join(baselines)}) ran slower "
            "than it can, e.g. on a busy machine or with more threads than free cores; rerun it alone "
            f"(gptbench suite FILE --only {baselines[0]}) before trusting these speedups."]


def parity_failures(records: list[dict]) -> list[dict]:
    """Runs whose tokens differ from the reference or whose logits are off by more than the tolerance."""
    return [r for r in records if value_at(r, "parity.tokens_match") is False or logits_beyond_tolerance(r)]


def logits_beyond_tolerance(record: dict) -> bool:
    diff, tolerance = value_at(record, "parity.max_abs_logit_diff"), value_at(record, "parity.tolerance")
    return diff is not None and tolerance is not None and diff > tolerance


def findings(records: list[dict]) -> list[str]:
    """One sentence per finding, in reading order."""
    best = best_by_throughput(records)
    if best is None:
        return ["No run finished with a throughput, so there is nothing to rank."] + unfinished_sentence(records)
    sentences = [f"Best throughput: {describe(best)}, {best['metrics']['throughput_tokens_per_s']:.1f} tokens/s"
                 + speedup_clause(best) + "."]
    sentences += superlinear_sentence(records)
    sentences += [loss_sentence(runs) for runs in by_strategy(scaling_losses(records))]
    sentences += [parity_sentence(run) for run in parity_failures(records)]
    sentences += [graph_break_sentence(runs) for runs in by_strategy(
        [run for run in records if (value_at(run, "metrics.graph_breaks") or 0) > 0])]
    return sentences + unfinished_sentence(records)


def describe(run: dict) -> str:
    return f"{run['run_id']} ({run['strategy']}, {value_at(run, 'topology.world_size')} ranks)"


def speedup_clause(run: dict) -> str:
    speedup, baseline = value_at(run, "metrics.speedup"), value_at(run, "metrics.baseline_run_id")
    if speedup is None or value_at(run, "metrics.scaling") == "baseline":
        return ""
    return f", {speedup:.2f}x the baseline {baseline} ({value_at(run, 'metrics.scaling')} scaling)"


def breakdown_text(run: dict, where: str = " of a profiled batch") -> str:
    """Where a profiled batch's time went, from metrics.time_breakdown, or the older
    communication share and bubble (which overlap: both count waiting for peers)."""
    parts = {p: value_at(run, f"metrics.time_breakdown.{p}") for p in BREAKDOWN_PARTS}
    if all(v is not None for v in parts.values()):
        return ", ".join(f"{v:.0%} {p}" for p, v in parts.items()) + where
    comm = value_at(run, "metrics.comm_fraction")
    bubble = value_at(run, "metrics.bubble_fraction.measured")
    theory = value_at(run, "metrics.bubble_fraction.theory")
    shares = []
    if comm is not None:
        shares.append(f"communication share {comm:.0%} (includes waiting for peers)")
    if bubble is not None:
        shares.append(f"pipeline idle {bubble:.0%}" + ("" if theory is None else f" (theory {theory:.0%})"))
    return (", ".join(shares) + where) if shares else "no time breakdown recorded"


def cpu_oversubscribed(run: dict) -> tuple[int, int, int] | None:
    """(ranks per node, threads per rank, usable cores) when a CPU run's ranks x threads
    exceed the cores it could use: then ranks wait for a core, not only for each other."""
    if value_at(run, "env.device") not in ("cpu", None):
        return None
    ranks, nodes = value_at(run, "topology.world_size"), value_at(run, "topology.nodes") or 1
    threads = value_at(run, "engine.threads_per_rank")
    cores = value_at(run, "env.cpus_usable") or value_at(run, "env.cpu_count")
    if not (ranks and threads and cores):
        return None
    per_node = -(-ranks // nodes)
    return (per_node, threads, cores) if per_node * threads > cores else None


def oversubscription_text(ranks: int, threads: int, cores: int) -> str:
    return (f"{ranks} ranks x {threads} thread(s) share {cores} CPU cores, so part of the loss "
            "is ranks waiting for a core, not the strategy")


def by_strategy(runs: list[dict]) -> list[list[dict]]:
    """The runs grouped by strategy (in the order the strategies first appear), fewest
    ranks first within a strategy: the findings say one line per strategy."""
    groups: dict[str, list[dict]] = {}
    for run in runs:
        groups.setdefault(run["strategy"], []).append(run)
    return [sorted(g, key=lambda r: value_at(r, "topology.world_size") or 1) for g in groups.values()]


def loss_sentence(runs: list[dict]) -> str:
    """One strategy's runs that lose scaling, each with its efficiency and time breakdown."""
    parts = [f"{run['topology']['world_size']} ranks ({run['run_id']}) efficiency "
             f"{run['metrics']['parallel_efficiency']:.0%}: {breakdown_text(run, '')}" for run in runs]
    crowded = max((c for c in map(cpu_oversubscribed, runs) if c), default=None)
    tail = f"; {oversubscription_text(*crowded)}" if crowded else ""
    return (f"Scaling lost: {runs[0]['strategy']}: {'; '.join(parts)} (shares of a profiled "
            f"batch){tail}.")


def graph_break_sentence(runs: list[dict]) -> str:
    listed = ", ".join(f"{run['run_id']} {run['metrics']['graph_breaks']} (engine.compile "
                       f"{value_at(run, 'engine.compile')})" for run in runs)
    return (f"Graph breaks: {runs[0]['strategy']} compiled its decode step with graph breaks "
            f"({listed}): those parts run eagerly, outside the compiled graph.")


def parity_sentence(run: dict) -> str:
    parity = run["parity"]
    parts = []
    if parity.get("tokens_match") is False:
        rate = parity.get("token_match_rate")
        parts.append("generated tokens differ from the reference"
                     + ("" if rate is None else f" (token match rate {rate:.2%})"))
    if parity.get("max_abs_logit_diff") is not None:
        relation = ">" if logits_beyond_tolerance(run) else "<="
        parts.append(f"max |Δlogit| {parity['max_abs_logit_diff']:.3g} {relation} tolerance {parity.get('tolerance')}")
    return f"Parity broken: {run['run_id']} ({run['strategy']}): {', '.join(parts)}."


def unfinished_sentence(records: list[dict]) -> list[str]:
    unfinished = [r for r in records if r["status"] != "ok"]
    if not unfinished:
        return []
    described = ", ".join(f"{r['run_id']} ({r['status']}"
                          + ("" if r.get("failed_rank") is None else f" on rank {r['failed_rank']}") + ")"
                          for r in unfinished)
    return [f"No results: {described}; their errors are in the tables."]
