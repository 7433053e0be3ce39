"""Charts of a suite. Each chart is a pure function of the run records that returns a
matplotlib Figure, or None when no finished run has its data: the report then neither
writes nor mentions it. Runs that are not ok are left out of every chart."""

import io
import math

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from gptbench.report.load import STRATEGY_ORDER
from gptbench.results import value_at

GIB_BYTES = 1024**3


def finished_with(records: list[dict], *paths: str) -> list[dict]:
    """The ok runs that have a value at every dotted path."""
    return [r for r in records if r["status"] == "ok" and all(value_at(r, p) is not None for p in paths)]


def new_figure(width_in: float = 9.0, height_in: float = 4.0) -> Figure:
    # A bare Figure on the Agg canvas, not pyplot: no global figure state, no display needed.
    figure = Figure(figsize=(width_in, height_in), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def grouped_bars(ax, labels: list[str], series: dict[str, list]) -> None:
    """One group of bars per label, one bar per series; a None value leaves a gap."""
    width = 0.8 / len(series)
    for index, (name, values) in enumerate(series.items()):
        offsets = [i - 0.4 + width * (index + 0.5) for i in range(len(labels))]
        heights = [math.nan if v is None else v for v in values]
        ax.bar(offsets, heights, width, label=name)
    label_configurations(ax, labels)


def legend_outside(ax) -> None:
    # Beside the axes, not inside: bars of any height stay visible.
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))


def label_configurations(ax, labels: list[str]) -> None:
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax.grid(axis="y", alpha=0.3)


def error_bars(runs: list[dict], value_path: str, interval_path: str, scale: float = 1.0):
    """matplotlib's yerr (2 x N: below, above) from each run's 95 % interval; 0 where a run
    has none (its bar then has no whisker); None when no run has one."""
    below, above, any_interval = [], [], False
    for run in runs:
        value, interval = value_at(run, value_path), value_at(run, interval_path)
        if isinstance(interval, list) and len(interval) == 2 and None not in interval:
            below.append(max(0.0, value - interval[0]) * scale)
            above.append(max(0.0, interval[1] - value) * scale)
            any_interval = True
        else:
            below.append(0.0)
            above.append(0.0)
    return [below, above] if any_interval else None


def throughput_chart(records: list[dict]) -> Figure | None:
    runs = finished_with(records, "metrics.throughput_tokens_per_s")
    if not runs:
        return None
    ax = new_figure().add_subplot()
    yerr = error_bars(runs, "metrics.throughput_tokens_per_s", "metrics.intervals.throughput_tokens_per_s")
    bars = ax.bar(range(len(runs)), [r["metrics"]["throughput_tokens_per_s"] for r in runs],
                  yerr=yerr, capsize=4 if yerr else 0)
    for bar, run in zip(bars, runs):  # an invalid run's bar is hatched
        if value_at(run, "metrics.validity.verdict") == "invalid":
            bar.set_hatch("//")
            bar.set_alpha(0.6)
    label_configurations(ax, [r["run_id"] for r in runs])
    ax.set_ylabel("generated tokens/s, all replicas")
    ax.set_title("Throughput by configuration" + (" (whiskers: 95 % interval; hatched: invalid)"
                                                  if yerr else ""))
    return ax.figure


def speedup_chart(records: list[dict]) -> Figure | None:
    runs = finished_with(records, "metrics.speedup", "topology.world_size")
    if not runs:
        return None
    ax = new_figure(7.0, 4.5).add_subplot()
    ranks = sorted({1} | {r["topology"]["world_size"] for r in runs})
    ax.plot(ranks, ranks, "k--", label="ideal (speedup = ranks)")
    for strategy in sorted({r["strategy"] for r in runs}, key=strategy_sort_key):
        mine = sorted((r for r in runs if r["strategy"] == strategy),
                      key=lambda r: r["topology"]["world_size"])
        yerr = error_bars(mine, "metrics.speedup", "metrics.intervals.speedup")
        ax.errorbar([r["topology"]["world_size"] for r in mine], [r["metrics"]["speedup"] for r in mine],
                    yerr=yerr, marker="o", capsize=4 if yerr else 0, label=strategy)
    ax.set_xticks(ranks)
    ax.set_xlabel("ranks")
    ax.set_ylabel("speedup over the baseline run")
    ax.set_title("Speedup vs ideal")
    ax.grid(alpha=0.3)
    ax.legend()
    return ax.figure


def strategy_sort_key(strategy: str) -> int:
    return STRATEGY_ORDER.index(strategy) if strategy in STRATEGY_ORDER else len(STRATEGY_ORDER)


def efficiency_chart(records: list[dict]) -> Figure | None:
    runs = finished_with(records, "metrics.parallel_efficiency")
    if not runs:
        return None
    ax = new_figure().add_subplot()
    ax.bar(range(len(runs)), [100 * r["metrics"]["parallel_efficiency"] for r in runs],
           yerr=error_bars(runs, "metrics.parallel_efficiency", "metrics.intervals.parallel_efficiency", 100))
    ax.axhline(100, color="k", linestyle="--", label="ideal")
    label_configurations(ax, [r["run_id"] for r in runs])
    ax.set_ylabel("parallel efficiency, % (speedup / ranks)")
    ax.set_title("Parallel efficiency")
    ax.legend()
    return ax.figure


def latency_chart(records: list[dict]) -> Figure | None:
    runs = finished_with(records, "metrics.ttft_ms", "metrics.tpot_ms")
    if not runs:
        return None
    figure = new_figure(11.0, 4.5)
    labels = [r["run_id"] for r in runs]
    axes = figure.subplots(1, 2)
    for ax, metric, title in zip(axes, ("ttft_ms", "tpot_ms"), ("Time to first token", "Time per output token")):
        grouped_bars(ax, labels, {q: [r["metrics"][metric].get(q) for r in runs] for q in ("p50", "p90", "p99")})
        ax.set_ylabel("ms")
        ax.set_title(title)
    legend_outside(axes[1])
    return figure


def memory_chart(records: list[dict]) -> Figure | None:
    """Measured peak per rank (bars) beside the model's bytes on that rank (black marks:
    weights + KV cache from the sharding model), so sharding shows even where the measured
    figure is a whole process's RSS."""
    runs = [r for r in finished_with(records, "metrics.peak_memory_bytes.per_rank")
            if r["metrics"]["peak_memory_bytes"]["per_rank"]]
    if not runs:
        return None
    ax = new_figure().add_subplot()
    labelled_ranks, model_marks = set(), []
    for i, run in enumerate(runs):
        per_rank = run["metrics"]["peak_memory_bytes"]["per_rank"]
        model = value_at(run, "metrics.model_memory_bytes.per_rank") or []
        width = 0.8 / len(per_rank)
        for rank, peak_bytes in enumerate(per_rank):
            label = None if rank in labelled_ranks else f"rank {rank}"
            labelled_ranks.add(rank)
            x = i - 0.4 + width * (rank + 0.5)
            ax.bar(x, math.nan if peak_bytes is None else peak_bytes / GIB_BYTES, width,
                   color=f"C{rank}", label=label)
            if rank < len(model) and model[rank] is not None:
                model_marks.append((x, model[rank] / GIB_BYTES))
    if model_marks:
        ax.scatter(*zip(*model_marks), marker="_", s=300, color="k", label="model bytes (weights + KV)")
    label_configurations(ax, [r["run_id"] for r in runs])
    kinds = sorted({str(r["metrics"]["peak_memory_bytes"].get("kind")) for r in runs})
    ax.set_ylabel(f"GiB (bars: peak {', '.join(kinds)})")
    ax.set_title("Memory per rank: measured peak and the model's bytes")
    legend_outside(ax)
    return ax.figure


def breakdown_chart(records: list[dict]) -> Figure | None:
    """Stacked compute / communication / waiting shares of one profiled batch per run."""
    parts = ("compute", "communication", "waiting")
    runs = finished_with(records, *(f"metrics.time_breakdown.{p}" for p in parts))
    if not runs:
        return None
    ax = new_figure().add_subplot()
    bottom = [0.0] * len(runs)
    for part, colour in zip(parts, ("C2", "C1", "C7")):
        shares = [100 * r["metrics"]["time_breakdown"][part] for r in runs]
        ax.bar(range(len(runs)), shares, 0.6, bottom=bottom, label=part, color=colour)
        bottom = [b + s for b, s in zip(bottom, shares)]
    label_configurations(ax, [r["run_id"] for r in runs])
    ax.set_ylim(0, 105)
    ax.set_ylabel("% of a profiled batch")
    ax.set_title("Where the time goes (one profiled batch after the timed ones)")
    legend_outside(ax)
    return ax.figure


def predicted_tpot_chart(records: list[dict]) -> Figure | None:
    runs = finished_with(records, "metrics.tpot_ms.p50", "metrics.predicted.tpot_ms")
    if not runs:
        return None
    ax = new_figure().add_subplot()
    grouped_bars(ax, [r["run_id"] for r in runs], {
        "measured TPOT p50": [r["metrics"]["tpot_ms"]["p50"] for r in runs],
        "predicted TPOT": [r["metrics"]["predicted"]["tpot_ms"] for r in runs],
    })
    ax.set_ylabel("ms per output token")
    ax.set_title("Time per output token: measured vs predicted")
    legend_outside(ax)
    return ax.figure


def roofline_chart(records: list[dict]) -> Figure | None:
    runs = finished_with(records, "metrics.throughput_tokens_per_s", "metrics.roofline.predicted_tokens_per_s")
    if not runs:
        return None
    ax = new_figure().add_subplot()
    grouped_bars(ax, [r["run_id"] for r in runs], {
        "measured": [r["metrics"]["throughput_tokens_per_s"] for r in runs],
        "roofline bound (memory bandwidth)": [r["metrics"]["roofline"]["predicted_tokens_per_s"] for r in runs],
    })
    # Log scale: the bound is often 10-30x the measurement, and both must stay readable.
    ax.set_yscale("log")
    ax.set_ylabel("tokens/s")
    ax.set_title("Measured vs roofline-predicted throughput")
    legend_outside(ax)
    return ax.figure


def energy_chart(records: list[dict]) -> Figure | None:
    """Joules per generated token (bars) and average watts (marks, right axis): NVML's
    energy counter over the timed passes, summed over the run's GPUs."""
    runs = finished_with(records, "metrics.energy.joules_per_token")
    if not runs:
        return None
    ax = new_figure().add_subplot()
    ax.bar(range(len(runs)), [r["metrics"]["energy"]["joules_per_token"] for r in runs], color="C2",
           label="J per generated token")
    label_configurations(ax, [r["run_id"] for r in runs])
    ax.set_ylabel("joules per generated token")
    watts = ax.twinx()
    watts.plot(range(len(runs)), [r["metrics"]["energy"]["average_watts"] for r in runs], "ko",
               label="average W (all GPUs)")
    watts.set_ylabel("average watts, all GPUs")
    watts.set_ylim(bottom=0)
    ax.set_title("Energy per token over the timed passes (NVML)")
    return ax.figure


# file name -> (caption, chart); the report shows them in this order.
CHARTS = {
    "throughput.png": ("Throughput by configuration (whiskers: 95 % interval)", throughput_chart),
    "speedup.png": ("Speedup vs ideal (dashed: speedup = number of ranks; whiskers: 95 % interval)",
                    speedup_chart),
    "efficiency.png": ("Parallel efficiency", efficiency_chart),
    "latency.png": ("Latency percentiles: TTFT and TPOT p50/p90/p99", latency_chart),
    "memory.png": ("Memory per rank: measured peak (bars) and the model's weights + KV cache (marks)",
                   memory_chart),
    "breakdown.png": ("Time breakdown per configuration: compute, communication, waiting", breakdown_chart),
    "tpot_predicted.png": ("TPOT: measured p50 vs predicted", predicted_tpot_chart),
    "roofline.png": ("Measured vs roofline-predicted throughput", roofline_chart),
    "energy.png": ("Energy per generated token (bars) and average power (marks), GPU runs only",
                   energy_chart),
}


def chart_pngs(records: list[dict]) -> dict[str, bytes]:
    """PNG bytes by file name, for the charts that have data."""
    pngs = {}
    for file_name, (_, chart) in CHARTS.items():
        figure = chart(records)
        if figure is not None:
            buffer = io.BytesIO()
            # No "Software" metadata: the same records give byte-identical PNGs.
            figure.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
            pngs[file_name] = buffer.getvalue()
    return pngs
