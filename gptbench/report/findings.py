"""Findings of a suite, computed from its run records, never written by hand: the best
configuration, where scaling is lost and what the records say it was lost to, parity breaks."""

from gptbench.report.load import value_at

# Below this parallel efficiency a configuration "loses scaling" and the report says why.
EFFICIENCY_LOSS_BELOW = 0.8
# A share of the timed region large enough to name as a cause of the loss.
CAUSE_SHARE_ABOVE = 0.1


def with_throughput(records: list[dict]) -> list[dict]:
    return [r for r in records if r["status"] == "ok" and value_at(r, "metrics.throughput_tokens_per_s") is not None]


def best_by_throughput(records: list[dict]) -> dict | None:
    runs = with_throughput(records)
    return max(runs, key=lambda r: r["metrics"]["throughput_tokens_per_s"]) if runs else None


def best_per_world_size(records: list[dict]) -> dict[int, dict]:
    """{world_size: the run with the highest throughput on that many ranks}."""
    by_world_size = {}
    for run in with_throughput(records):
        by_world_size.setdefault(value_at(run, "topology.world_size"), []).append(run)
    return {world_size: best_by_throughput(runs) for world_size, runs in sorted(by_world_size.items())}


def scaling_losses(records: list[dict]) -> list[dict]:
    """Multi-rank ok runs whose parallel efficiency is below EFFICIENCY_LOSS_BELOW."""
    return [r for r in records if r["status"] == "ok" and (value_at(r, "topology.world_size") or 1) > 1
            and value_at(r, "metrics.parallel_efficiency") is not None
            and r["metrics"]["parallel_efficiency"] < EFFICIENCY_LOSS_BELOW]


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
    for world_size, run in best_per_world_size(records).items():
        ranks = f"{world_size} rank{'s' if world_size != 1 else ''}"
        sentences.append(f"Best at {ranks}: {run['run_id']} ({run['strategy']}), "
                         f"{run['metrics']['throughput_tokens_per_s']:.1f} tokens/s{efficiency_clause(run)}.")
    sentences += [loss_sentence(run) for run in scaling_losses(records)]
    sentences += [parity_sentence(run) for run in parity_failures(records)]
    return sentences + unfinished_sentence(records)


def describe(run: dict) -> str:
    return f"{run['run_id']} ({run['strategy']}, {value_at(run, 'topology.world_size')} ranks)"


def speedup_clause(run: dict) -> str:
    speedup, baseline = value_at(run, "metrics.speedup"), value_at(run, "metrics.baseline_run_id")
    return "" if speedup is None else f", {speedup:.2f}x the baseline {baseline or 'run'}"


def efficiency_clause(run: dict) -> str:
    efficiency = value_at(run, "metrics.parallel_efficiency")
    return "" if efficiency is None else f", parallel efficiency {efficiency:.0%}"


def loss_sentence(run: dict) -> str:
    comm = value_at(run, "metrics.comm_fraction")
    bubble = value_at(run, "metrics.bubble_fraction.measured")
    theory = value_at(run, "metrics.bubble_fraction.theory")
    causes = []
    if comm is not None and comm > CAUSE_SHARE_ABOVE:
        causes.append(f"communication {comm:.0%} of the timed region")
    if bubble is not None and bubble > CAUSE_SHARE_ABOVE:
        grid = f"pp={value_at(run, 'topology.pp')}, m={value_at(run, 'topology.micro_batches')}"
        theory_text = "" if theory is None else f" (theory {theory:.0%} for {grid})"
        causes.append(f"pipeline bubble {bubble:.0%} of the timed region{theory_text}")
    if not causes:
        causes.append("neither communication nor pipeline bubble above "
                      f"{CAUSE_SHARE_ABOVE:.0%} of the timed region explains it")
    return (f"Scaling lost: {run['strategy']} at {run['topology']['world_size']} ranks ({run['run_id']}): "
            f"efficiency {run['metrics']['parallel_efficiency']:.0%}, {', '.join(causes)}.")


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
