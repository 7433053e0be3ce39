"""Emulated rows (`gptbench emulate`, records with an `emulation` section) apart from the
measured ones: their own table and chart, never in speedups, findings or the recommendation.
Pure functions of the records; every number is formatted here."""

from gptbench.report.charts import label_configurations, new_figure
from gptbench.results import value_at

MISSING = "—"
INTRO = ("Emulated rows are predictions, not measurements: each rank role was built and timed "
         "alone on one device under a fake process group, and the collectives were added "
         "at the named latencies; they take no part in the speedups or the recommendation.")


def is_emulated(record: dict) -> bool:
    return bool(record.get("emulation"))


def split(records: list[dict]) -> tuple[list[dict], list[dict]]:
    """(measured, emulated), each in the order given."""
    return ([r for r in records if not is_emulated(r)], [r for r in records if is_emulated(r)])


def _fmt(value, spec: str) -> str:
    return MISSING if value is None else format(value, spec)


def _bytes(value) -> str:
    if value is None:
        return MISSING
    return f"{value / 1024**3:.2f} GiB" if value >= 1024**3 else f"{value / 1024**2:.1f} MiB"


def row(record: dict) -> dict:
    at = lambda path: value_at(record, path)  # noqa: E731
    emu = record.get("emulation") or {}
    scope = emu.get("scope") or {}
    fits = emu.get("fits") or {}
    grid = "x".join(f"{k}{at(f'topology.{k}')}" for k in ("dp", "tp", "pp"))
    fit = MISSING if fits.get("fits") is None else (
        f"{'fits' if fits['fits'] else 'does NOT fit'} {fits.get('card')}")
    return {
        "run_id": record["run_id"], "strategy": record.get("strategy") or MISSING,
        "ranks": at("topology.world_size"), "grid": grid,
        "status": record["status"] if record["status"] != "ok" else "ok (emulated)",
        "error": record.get("error") or "",
        "tpot_ms": _fmt(at("metrics.predicted.tpot_ms"), ".2f"),
        "ttft_ms": _fmt(at("metrics.predicted.ttft_ms"), ".1f"),
        "tokens_per_s": _fmt(at("metrics.predicted.tokens_per_s"), ".1f"),
        "compute_ms": ", ".join(f"{x:.2f}" for x in at("metrics.predicted.compute_ms_per_step") or [])
        or MISSING,
        "memory": _bytes(at("metrics.peak_memory_bytes.max")),
        "fits": fit,
        "scope": "in scope" if scope.get("in_scope", True) else f"out of scope: {scope.get('reason')}",
        "latency_source": (emu.get("latency_source") or MISSING).split(" (")[0],
        "ok": record["status"] == "ok",
    }


def rows(records: list[dict]) -> list[dict]:
    return [row(r) for r in records]


def chart(records: list[dict]):
    """Predicted tokens/s of the ok emulated rows (hatched: out of the model's scope)."""
    runs = [r for r in records if r["status"] == "ok"
            and value_at(r, "metrics.predicted.tokens_per_s") is not None]
    if not runs:
        return None
    ax = new_figure().add_subplot()
    for i, r in enumerate(runs):
        scope = (r["emulation"].get("scope") or {}).get("in_scope", True)
        ax.bar(i, r["metrics"]["predicted"]["tokens_per_s"], hatch=None if scope else "//",
               color="tab:gray", label=None if scope else "out of the model's scope")
    label_configurations(ax, [r["run_id"] for r in runs])
    if any(not (r["emulation"].get("scope") or {}).get("in_scope", True) for r in runs):
        handles, labels = ax.get_legend_handles_labels()
        ax.legend(handles[:1], labels[:1], loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_ylabel("predicted tokens/s, all replicas")
    ax.set_title("EMULATED (predicted, not measured): throughput by configuration")
    return ax.figure


CHART_FILE = "emulated.png"
CHART_CAPTION = "Emulated rows: predicted throughput (not measured)"
