"""The report's first answer: what to run on N GPUs (ranks). For each rank count, the
configuration with the highest throughput among the finished runs whose parity holds, by how
much it beats the next best, and why the others lose, in one line from their time breakdown
(`metrics.time_breakdown`: shares of one profiled batch taken after the timed ones)."""

from gptbench.report.findings import (
    breakdown_text,
    cpu_oversubscribed,
    oversubscription_text,
    parity_failures,
    with_throughput,
)
from gptbench.results import value_at

INTRO = ("For each number of ranks, the fastest configuration measured here (tokens/s, all "
         "replicas), how much faster it is than the next best, and where the others lose time "
         "(shares of one profiled batch after the timed ones).")


def ranked(records: list[dict]) -> dict[int, list[dict]]:
    """{rank count: its finished runs whose parity holds, fastest first}, fewest ranks first."""
    broken = {r["run_id"] for r in parity_failures(records)}
    by_ranks: dict[int, list[dict]] = {}
    for run in with_throughput(records):
        if run["run_id"] not in broken:
            by_ranks.setdefault(value_at(run, "topology.world_size") or 1, []).append(run)
    return {ranks: sorted(runs, key=throughput, reverse=True)
            for ranks, runs in sorted(by_ranks.items())}


def table(records: list[dict]) -> list[dict]:
    """The recommendation at a glance, one row of prepared cells per rank count: the best
    configuration, its tokens/s and speedup, the next best and why it loses."""
    rows = []
    for ranks, runs in ranked(records).items():
        best = runs[0]
        speedup, scaling = value_at(best, "metrics.speedup"), value_at(best, "metrics.scaling")
        row = {"ranks": str(ranks), "best": name(best),
               "tokens_per_s": f"{throughput(best):.1f}{plus_minus(best)}",
               "speedup": ("baseline" if scaling == "baseline" else
                           "—" if speedup is None else f"{speedup:.2f}x ({scaling})"),
               "next_best": "—", "why": "the only configuration measured at this rank count"}
        if len(runs) > 1:
            second = runs[1]
            row["next_best"] = f"{name(second)}, {throughput(second):.1f}{plus_minus(second)} tokens/s"
            tie = indistinguishable(best, second)
            row["why"] = (f"{tie}: it may not lose" if tie else
                          f"{throughput(best) / throughput(second):.2f}x behind: "
                          f"{breakdown_text(second, '')}")
        rows.append(row)
    return rows


def recommendations(records: list[dict]) -> list[str]:
    """One sentence per rank count, fewest ranks first."""
    broken = {r["run_id"] for r in parity_failures(records)}
    by_ranks = ranked(records)
    if not by_ranks:
        return ["Nothing to recommend: no run finished with a throughput and matching tokens."]
    sentences = [for_rank_count(ranks, runs) for ranks, runs in by_ranks.items()]
    if broken:
        sentences.append(f"Left out because their tokens or logits differ from the reference: "
                         f"{', '.join(sorted(broken))}.")
    return sentences


def throughput(run: dict) -> float:
    return run["metrics"]["throughput_tokens_per_s"]


def name(run: dict) -> str:
    return f"{run['strategy']} ({run['run_id']})"


def interval(run: dict) -> list[float] | None:
    ci = value_at(run, "metrics.intervals.throughput_tokens_per_s")
    return ci if isinstance(ci, list) and len(ci) == 2 and None not in ci else None


def plus_minus(run: dict) -> str:
    ci = interval(run)
    return f" ± {(ci[1] - ci[0]) / 2:.1f}" if ci else ""


def indistinguishable(best: dict, second: dict) -> str | None:
    """The sentence saying two configurations' throughputs cannot be told apart: each lies
    within the other's 95 % interval. None when they can, or without intervals."""
    a, b = interval(best), interval(second)
    if not a or not b or not (a[0] <= throughput(second) <= a[1] and b[0] <= throughput(best) <= b[1]):
        return None
    return (f"{best['run_id']} and {second['run_id']} are not distinguishable on this machine "
            "(each throughput lies within the other's 95 % interval)")


def for_rank_count(ranks: int, runs: list[dict]) -> str:
    """"N ranks: <best>, X tokens/s, Yx the next best, <second>, Zx one rank. Why: ..."."""
    best = runs[0]
    head = (f"{ranks} rank{'s' if ranks != 1 else ''}: {name(best)}, {throughput(best):.1f}"
            f"{plus_minus(best)} tokens/s")
    if len(runs) > 1:
        head += f", {throughput(best) / throughput(runs[1]):.2f}x the next best, {name(runs[1])}"
        tie = indistinguishable(best, runs[1])
        head += f", but {tie}" if tie else ""
    else:
        head += ", the only configuration measured at this rank count"
    speedup, scaling = value_at(best, "metrics.speedup"), value_at(best, "metrics.scaling")
    if scaling == "baseline":
        head += " (the 1-rank baseline of the speedups)"
    elif speedup is not None:
        head += f", {speedup:.2f}x one rank ({scaling} scaling)"
    why = [f"{name(run)} loses: {breakdown_text(run, '')}" for run in runs[1:]]
    if len(runs) > 1:
        why.append(f"{best['run_id']} itself: {breakdown_text(best, '')}")
    crowded = cpu_oversubscribed(best) or next((c for c in map(cpu_oversubscribed, runs) if c), None)
    if crowded:
        why.append(oversubscription_text(*crowded))
    return head + (". Why: " + "; ".join(why) if why else "") + "."
