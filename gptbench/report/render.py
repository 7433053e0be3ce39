"""Write a suite's report from its run records: summary.csv, report.md, report.html (one
self-contained file: inline CSS, charts as base64 data URIs) and the chart PNGs beside them.
Every number is formatted here; the templates only place prepared strings."""

import base64
import csv
import io
import json
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

from gptbench.report.charts import CHARTS, byte_unit, chart_pngs
from gptbench.report.findings import findings
from gptbench.report.load import load_runs
from gptbench.report.recommend import INTRO as RECOMMENDATION_INTRO
from gptbench.report.recommend import recommendations
from gptbench.report.recommend import table as recommendation_table
from gptbench.results import value_at, write_atomic

MISSING = "—"  # what any null renders as; the record's null_reasons say why (notes section)
SETUP_SECTIONS = ("model", "workload", "engine")
# Topology keys that describe the setup rather than the configuration's grid.
SETUP_TOPOLOGY_KEYS = ("nodes", "hosts", "pipeline_schedule", "partition_method", "pipe_topology")
MEMORY_KINDS = {"rss": "RSS, whole process", "cuda_allocated": "CUDA peak allocated"}

# summary.csv column -> dotted path in the run record; one row per run, raw values.
SUMMARY_COLUMNS = {
    "run_id": "run_id", "status": "status", "strategy": "strategy",
    "world_size": "topology.world_size", "dp": "topology.dp", "tp": "topology.tp", "pp": "topology.pp",
    "micro_batches": "topology.micro_batches",
    "nodes": "topology.nodes",
    "throughput_tokens_per_s": "metrics.throughput_tokens_per_s",
    "throughput_tokens_per_s_ci95": "metrics.intervals.throughput_tokens_per_s",
    "speedup": "metrics.speedup", "speedup_ci95": "metrics.intervals.speedup",
    "validity": "metrics.validity.verdict", "timed_passes": "metrics.timed_passes.count",
    "energy_joules": "metrics.energy.joules", "energy_joules_per_token": "metrics.energy.joules_per_token",
    "average_watts": "metrics.energy.average_watts",
    "parallel_efficiency": "metrics.parallel_efficiency", "scaling": "metrics.scaling",
    "baseline_run_id": "metrics.baseline_run_id",
    "ttft_ms_p50": "metrics.ttft_ms.p50", "ttft_ms_p99": "metrics.ttft_ms.p99",
    "tpot_ms_p50": "metrics.tpot_ms.p50", "tpot_ms_p99": "metrics.tpot_ms.p99",
    "tpot_ms_predicted": "metrics.predicted.tpot_ms",
    "e2e_ms_mean": "metrics.e2e_ms.mean", "peak_memory_bytes_max": "metrics.peak_memory_bytes.max",
    "peak_memory_kind": "metrics.peak_memory_bytes.kind",
    "gpu_utilization_pct_mean": "metrics.gpu_utilization_pct.mean", "comm_fraction": "metrics.comm_fraction",
    "bubble_fraction": "metrics.bubble_fraction.measured",
    "compute_share": "metrics.time_breakdown.compute",
    "communication_share": "metrics.time_breakdown.communication",
    "waiting_share": "metrics.time_breakdown.waiting",
    "roofline_fraction_of_peak": "metrics.roofline.fraction_of_peak",
    "tokens_match": "parity.tokens_match", "max_abs_logit_diff": "parity.max_abs_logit_diff", "error": "error",
}


def render_report(suite_dir, title: str | None = None) -> tuple[dict[str, Path], list[tuple[Path, str]]]:
    """Render suite_dir/runs/*.json into suite_dir: ({file name: path} of what was written,
    [(path, reason)] of the files in runs/ that were skipped, also listed in the report)."""
    suite_dir = Path(suite_dir)
    from gptbench.report import emulated

    records, skipped = load_runs(suite_dir)
    written = {"summary.csv": write_summary_csv(records, suite_dir / "summary.csv")}
    records, emulated_records = emulated.split(records)
    pngs = chart_pngs(records)
    for file_name in CHARTS:
        path = suite_dir / file_name
        if file_name in pngs:
            write_atomic(path, pngs[file_name])
            written[file_name] = path
        else:
            # Left by an earlier render whose data is gone; the report no longer shows it.
            path.unlink(missing_ok=True)
    context = report_context(records, skipped, pngs, title or f"gptbench report: {suite_dir.resolve().name}")
    context.update(emulated_context(emulated_records, suite_dir, written))
    templates = template_environment()
    for file_name in ("report.md", "report.html"):
        path = suite_dir / file_name
        write_atomic(path, templates.get_template(f"{file_name}.j2").render(context).encode("utf-8"))
        written[file_name] = path
    return written, skipped


def emulated_context(records: list[dict], suite_dir: Path, written: dict) -> dict:
    """The emulated rows' table and chart (gptbench/report/emulated.py), written apart."""
    from gptbench.report import emulated

    path = suite_dir / emulated.CHART_FILE
    figure = emulated.chart(records)
    chart = None
    if figure is None:
        path.unlink(missing_ok=True)
    else:
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
        write_atomic(path, buffer.getvalue())
        written[emulated.CHART_FILE] = path
        chart = {"file": emulated.CHART_FILE, "caption": emulated.CHART_CAPTION,
                 "data_uri": "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")}
    return {"emulated_intro": emulated.INTRO, "emulated_rows": emulated.rows(records),
            "emulated_chart": chart}


def write_summary_csv(records: list[dict], path: Path) -> Path:
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=list(SUMMARY_COLUMNS))
    writer.writeheader()
    for record in records:
        writer.writerow({column: csv_value(value_at(record, dotted)) for column, dotted in SUMMARY_COLUMNS.items()})
    write_atomic(path, text.getvalue().encode("utf-8"))
    return path


def csv_value(value):
    if isinstance(value, list):  # an interval: "low high"
        return " ".join(f"{v:.6g}" if isinstance(v, float) else str(v) for v in value)
    return "" if value is None else value


def report_context(records: list[dict], skipped: list, pngs: dict[str, bytes], title: str) -> dict:
    setup_runs = [r for r in records if r["status"] == "ok"] or records
    shared, differing = split_setup(setup_runs, setup_sections(setup_runs))
    env_shared, env_differing = split_setup(setup_runs, [r.get("env") or {} for r in setup_runs])
    return {
        "title": title,
        "status_counts": status_counts(records),
        "recommendation_intro": RECOMMENDATION_INTRO,
        "recommendations": recommendations(records),
        "recommendation_table": recommendation_table(records),
        "rows": [table_row(r) for r in records],
        "findings": findings(records),
        "charts": [{"file": name, "caption": CHARTS[name][0],
                    "data_uri": "data:image/png;base64," + base64.b64encode(png).decode("ascii")}
                   for name, png in pngs.items()],
        "setup_scope": f"the {len(setup_runs)} {'finished ' if setup_runs is not records else ''}run(s)",
        "setup": shared, "setup_differing": differing,
        "environment": env_shared, "environment_differing": env_differing,
        "notes": notes(records),
        "skipped": [{"file": path.name, "reason": reason} for path, reason in skipped],
    }


def setup_sections(records: list[dict]) -> list[dict]:
    """{"model.name": ..., "engine.threads_per_rank": ...} per record: what it ran with."""
    out = []
    for record in records:
        flat = {f"{section}.{key}": value for section in SETUP_SECTIONS
                for key, value in (record.get(section) or {}).items()}
        topology = record.get("topology") or {}
        flat.update({f"topology.{key}": topology[key] for key in SETUP_TOPOLOGY_KEYS if key in topology})
        out.append(flat)
    return out


def split_setup(records: list[dict], flats: list[dict]) -> tuple[list[dict], list[dict]]:
    """([{key, value}] shared by every run, [{run_id, cells}] of what differs, per run).

    A key a record lacks (written before the key existed) is not a difference: the shared
    value then says how many runs did not record it."""
    keys = dict.fromkeys(key for flat in flats for key in flat)
    shared, differ = [], []
    for key in keys:
        present = {display(flat[key]) for flat in flats if key in flat}
        if len(present) > 1:
            differ.append(key)
            continue
        lacking = sum(key not in flat for flat in flats)
        shared.append({"key": key, "value": present.pop() + (f" (not recorded by {lacking} run(s))" if lacking else "")})
    per_run = [{"run_id": record["run_id"],
                "cells": [{"key": key, "value": display(flat[key]) if key in flat else "not recorded"} for key in differ]}
               for record, flat in zip(records, flats)] if differ else []
    return shared, per_run


def notes(records: list[dict]) -> list[dict]:
    """Why values are "—", and what to know about a figure: one line per (field, reason),
    naming the runs (or "every run")."""
    grouped: dict[tuple[str, str], list[str]] = {}
    for record in records:
        for field, reason in (record.get("null_reasons") or {}).items():
            grouped.setdefault((field, reason), []).append(record["run_id"])
        breaks = value_at(record, "metrics.graph_breaks")
        if breaks:
            grouped.setdefault(("metrics.graph_breaks", f"{breaks} graph break(s) in the compiled decode step "
                                f"(engine.compile {value_at(record, 'engine.compile')}): those parts ran "
                                "eagerly"), []).append(record["run_id"])
        late = value_at(record, "metrics.compile.graphs_while_measuring")
        if isinstance(late, int) and late > 0:
            grouped.setdefault(("metrics.compile.graphs_while_measuring", f"{late} graph(s) compiled inside the "
                                "measured region: its timings include compilation"), []).append(record["run_id"])
        source = value_at(record, "metrics.time_breakdown.source")
        if isinstance(source, str):
            grouped.setdefault(("metrics.time_breakdown", source), []).append(record["run_id"])
    every = len(records) > 1
    return [{"runs": "every run" if every and len(run_ids) == len(records) else ", ".join(run_ids),
             "field": field, "reason": reason} for (field, reason), run_ids in grouped.items()]


def status_counts(records: list[dict]) -> str:
    counts = {}
    for record in records:
        counts[record["status"]] = counts.get(record["status"], 0) + 1
    return ", ".join(f"{count} {status}" for status, count in counts.items()) or "no runs"


def table_row(record: dict) -> dict:
    """The report's cells for one run, formatted; a null metric is MISSING."""
    def at(path):
        return value_at(record, path)

    return {
        "run_id": record["run_id"],
        "strategy": record.get("strategy") or MISSING,
        "ranks": fmt(at("topology.world_size"), "d"),
        "grid": grid_text(record),
        "ok": record["status"] == "ok",
        "status": record["status"],
        "status_text": status_text(record),
        "error": record.get("error") or MISSING,
        "throughput": fmt(at("metrics.throughput_tokens_per_s"), ".1f")
        + plus_minus(at("metrics.intervals.throughput_tokens_per_s"), ".1f"),
        "speedup": fmt(at("metrics.speedup"), ".2f", "x") + plus_minus(at("metrics.intervals.speedup"), ".2f"),
        "efficiency": fmt(at("metrics.parallel_efficiency"), ".1%")
        + plus_minus(at("metrics.intervals.parallel_efficiency"), ".1%"),
        "validity": validity_text(at("metrics.validity")),
        "invalid": at("metrics.validity.verdict") == "invalid",
        "energy_j": fmt(at("metrics.energy.joules"), ".1f"),
        "watts": fmt(at("metrics.energy.average_watts"), ".1f"),
        "j_per_token": fmt(at("metrics.energy.joules_per_token"), ".3g"),
        "e2e_mean_ms": fmt(at("metrics.e2e_ms.mean"), ".1f"),
        "gpu_util": util_text(at("metrics.gpu_utilization_pct.mean"),
                              at("metrics.bubble_fraction.stage_busy_fraction")),
        "ttft_p50_ms": fmt(at("metrics.ttft_ms.p50"), ".1f") + plus_minus(at("metrics.intervals.ttft_ms_p50"), ".1f"),
        "ttft_p99_ms": fmt(at("metrics.ttft_ms.p99"), ".1f"),
        "tpot_p50_ms": fmt(at("metrics.tpot_ms.p50"), ".1f") + plus_minus(at("metrics.intervals.tpot_ms_p50"), ".2f"),
        "tpot_p99_ms": fmt(at("metrics.tpot_ms.p99"), ".1f"),
        "memory_per_rank": memory_text(at("metrics.peak_memory_bytes.per_rank"), at("metrics.peak_memory_bytes.kind")),
        "model_memory_per_rank": memory_text(at("metrics.model_memory_bytes.per_rank")),
        "comm": fmt(at("metrics.comm_fraction"), ".1%"),
        "breakdown": breakdown_cell(record),
        "tpot_predicted_ms": fmt(at("metrics.predicted.tpot_ms"), ".1f"),
        "tpot_ratio": ratio_text(at("metrics.tpot_ms.p50"), at("metrics.predicted.tpot_ms")),
        "scaling": at("metrics.scaling") or MISSING,
        "bubble": bubble_text(at("metrics.bubble_fraction.measured"), at("metrics.bubble_fraction.theory")),
        "roofline": fmt(at("metrics.roofline.fraction_of_peak"), ".1%"),
        "parity": parity_text(record.get("parity")),
    }


def util_text(kernel_resident_pct, stage_busy) -> str:
    """NVML's kernel-resident share, and for pipelines the stages' busy share (the work)."""
    text = fmt(kernel_resident_pct, ".1f", "%")
    busy = [b for b in stage_busy or [] if b is not None]
    if busy:
        text += f" · stage busy {sum(busy) / len(busy):.0%}"
    return text


def fmt(value, spec: str, suffix: str = "") -> str:
    return MISSING if value is None else f"{value:{spec}}{suffix}"


def plus_minus(interval, spec: str) -> str:
    """" ± h", h half the width of the 95 % interval [low, high]; "" without one."""
    if not isinstance(interval, list) or len(interval) != 2 or None in interval:
        return ""
    return f" ± {(interval[1] - interval[0]) / 2:{spec}}"


def validity_text(validity) -> str:
    if not isinstance(validity, dict) or validity.get("verdict") is None:
        return MISSING
    if validity["verdict"] == "valid":
        return "valid"
    return "INVALID: " + "; ".join(validity.get("reasons") or ["no reason recorded"])


def grid_text(record: dict) -> str:
    topology = record.get("topology") or {}
    if any(topology.get(axis) is None for axis in ("dp", "tp", "pp")):
        return MISSING
    grid = f"dp{topology['dp']} tp{topology['tp']} pp{topology['pp']}"
    grid += f" m{topology['micro_batches']}" if topology["pp"] > 1 else ""
    return grid + (f" on {topology['nodes']} nodes" if (topology.get("nodes") or 1) > 1 else "")


def breakdown_cell(record: dict) -> str:
    parts = [value_at(record, f"metrics.time_breakdown.{p}") for p in ("compute", "communication", "waiting")]
    return MISSING if None in parts else " / ".join(f"{v:.0%}" for v in parts)


def ratio_text(measured, predicted) -> str:
    return MISSING if measured is None or not predicted else f"{measured / predicted:.2f}"


def status_text(record: dict) -> str:
    if record["status"] == "ok":
        return "ok"
    rank = "" if record.get("failed_rank") is None else f" (rank {record['failed_rank']})"
    return f"{record['status']}{rank}: {record.get('error') or 'no error recorded'}"


def memory_text(per_rank_bytes, kind: str | None = None) -> str:
    if not per_rank_bytes or all(b is None for b in per_rank_bytes):
        return MISSING
    label = "" if kind is None else f" ({MEMORY_KINDS.get(kind, kind)})"
    unit, unit_bytes = byte_unit(max(b for b in per_rank_bytes if b is not None))
    return (" / ".join(fmt(None if b is None else b / unit_bytes, ".2f") for b in per_rank_bytes)
            + f" {unit}" + label)


def bubble_text(measured, theory) -> str:
    if measured is None:
        return MISSING
    return f"{measured:.1%}" + ("" if theory is None else f" (theory {theory:.1%})")


def parity_text(parity: dict | None) -> str:
    if not parity or parity.get("tokens_match") is None:
        return MISSING
    diff, tolerance = parity.get("max_abs_logit_diff"), parity.get("tolerance")
    tolerance_text = "" if tolerance is None else f" (tol {tolerance:g})"
    logits = "" if diff is None else f", max |Δlogit| {diff:.2g}{tolerance_text}"
    if parity["tokens_match"]:
        return "tokens match" + logits
    rate = parity.get("token_match_rate")
    return "TOKENS DIFFER" + ("" if rate is None else f" ({rate:.2%} match)") + logits


def display(value) -> str:
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True, separators=(", ", ": "))
    return MISSING if value is None else str(value)


def md_cell(text: str) -> str:
    """Escape what would break a Markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def template_environment() -> Environment:
    environment = Environment(
        loader=FileSystemLoader(Path(__file__).parent / "templates"),
        autoescape=select_autoescape(enabled_extensions=("html.j2",), default_for_string=False),
        undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
    )
    environment.filters["md_cell"] = md_cell
    return environment
