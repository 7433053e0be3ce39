"""The report, rendered from hand-written fixture records (tests/fixtures/suite/runs)."""

import base64
import csv
import json
import re
import shutil
from pathlib import Path

import pytest

from gptbench.errors import UserError
from gptbench.report import charts, findings
from gptbench.report.load import load_runs
from gptbench.report.render import SUMMARY_COLUMNS, render_report
from gptbench.results import value_at
from paths import FIXTURES
from records import edit_run as edit

FIXTURE_SUITE = Path(FIXTURES) / "suite"
TITLE = "Fixture suite (hand-written test data)"
# Sorted by (world_size, strategy dp, tp, pp, full, run_id).
ALL_RUN_IDS = ["1gpu-dp1", "2gpu-dp2", "2gpu-tp2", "2gpu-pp2", "2gpu-full",
               "4gpu-dp4", "4gpu-tp2-dp2", "4gpu-tp4", "4gpu-pp2-dp2", "4gpu-tp2-pp2"]


def copy_suite(destination: Path) -> Path:
    shutil.copytree(FIXTURE_SUITE, destination)
    return destination


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    """(suite dir, written paths) of one render of the fixture suite, shared: rendering takes seconds."""
    suite_dir = copy_suite(tmp_path_factory.mktemp("rendered") / "suite")
    return suite_dir, render_report(suite_dir, title=TITLE)[0]


def test_load_runs_sorts_and_skips_corrupt_and_foreign_files(tmp_path):
    records, skipped = load_runs(copy_suite(tmp_path / "suite"))
    assert [r["run_id"] for r in records] == ALL_RUN_IDS
    reasons = {path.name: reason for path, reason in skipped}
    assert set(reasons) == {"corrupt.json", "foreign.json"}
    assert "not valid JSON" in reasons["corrupt.json"]
    assert "pytest-benchmark/4" in reasons["foreign.json"]


def test_load_runs_skips_a_duplicate_run_id(tmp_path):
    suite_dir = copy_suite(tmp_path / "suite")
    shutil.copy(suite_dir / "runs" / "4gpu-dp4.json", suite_dir / "runs" / "zz-copy.json")
    records, skipped = load_runs(suite_dir)
    assert [r["run_id"] for r in records].count("4gpu-dp4") == 1
    assert ("zz-copy.json", "duplicate run_id '4gpu-dp4'; runs/4gpu-dp4.json is used") in \
        [(p.name, reason) for p, reason in skipped]


def test_load_runs_without_runs_dir_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="runs"):
        load_runs(tmp_path)


def test_render_writes_csv_md_html_and_every_chart(rendered):
    suite_dir, written = rendered
    assert set(written) == {"summary.csv", "report.md", "report.html"} | set(charts.CHARTS)
    for name, path in written.items():
        assert path == suite_dir / name and path.stat().st_size > 0
    for name in charts.CHARTS:
        assert written[name].read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_summary_csv_has_one_row_per_run_with_flat_columns(rendered):
    suite_dir, _ = rendered
    with (suite_dir / "summary.csv").open(newline="") as file:
        reader = csv.DictReader(file)
        rows = {row["run_id"]: row for row in reader}
        assert reader.fieldnames == list(SUMMARY_COLUMNS)
    assert list(rows) == ALL_RUN_IDS
    assert float(rows["4gpu-dp4"]["throughput_tokens_per_s"]) == 624.6
    assert float(rows["2gpu-tp2"]["peak_memory_bytes_max"]) == 1_830_000_000
    assert rows["4gpu-tp4"]["status"] == "failed"
    assert rows["4gpu-tp4"]["throughput_tokens_per_s"] == ""
    assert "NCCL error" in rows["4gpu-tp4"]["error"]
    assert rows["2gpu-full"]["status"] == "not_applicable"
    assert rows["2gpu-pp2"]["gpu_utilization_pct_mean"] == ""


def test_every_configuration_is_in_md_and_html(rendered):
    suite_dir, _ = rendered
    md, html = (suite_dir / "report.md").read_text(), (suite_dir / "report.html").read_text()
    for run_id in ALL_RUN_IDS:
        assert re.search(rf"^\| {re.escape(run_id)} \|", md, re.MULTILINE), run_id
        assert f"<td>{run_id}</td>" in html, run_id
    assert md.startswith(f"# {TITLE}\n") and f"<h1>{TITLE}</h1>" in html


def test_md_table_row_holds_the_formatted_numbers(rendered):
    md = (rendered[0] / "report.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| 4gpu-tp2-dp2 | tensor_data_hybrid"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells == ["4gpu-tp2-dp2", "tensor_data_hybrid", "4", "dp2 tp2 pp1", "ok", "—", "353.4", "2.19x", "54.8%",
                     "weak", "1457.5", "47.0%"]


def test_failed_and_not_applicable_runs_are_shown_with_their_error(rendered):
    suite_dir, _ = rendered
    md, html = (suite_dir / "report.md").read_text(), (suite_dir / "report.html").read_text()
    failed_error = "RuntimeError: NCCL error in all_reduce: unhandled system error (fixture)"
    na_error = "full_model_parallel needs tp&gt;=2 and pp&gt;=2"
    assert f"| 4gpu-tp4 | tensor_data_hybrid | 4 | dp1 tp4 pp1 | failed (rank 3): {failed_error} |" in md
    assert "| 2gpu-full | full_model_parallel | 2 | — | not_applicable: full_model_parallel needs tp>=2" in md
    assert failed_error in html and na_error in html


def test_null_metrics_render_as_dash_and_their_reasons_are_noted(rendered):
    suite_dir, _ = rendered
    md = (suite_dir / "report.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| 2gpu-pp2 | pipeline_data_hybrid"))
    assert row.rstrip().endswith("| 1746.2 | — |")  # GPU utilisation is null in the record
    assert "None" not in md and "nan" not in md
    assert "- 2gpu-pp2, `metrics.gpu_utilization_pct`: NVML sampler got 1 sample" in md
    assert "NVML sampler got 1 sample" in (suite_dir / "report.html").read_text()


def test_html_is_self_contained_with_charts_as_data_uris(rendered):
    suite_dir, written = rendered
    html = (suite_dir / "report.html").read_text()
    uris = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert sorted(base64.b64decode(uri) for uri in uris) == sorted(written[name].read_bytes() for name in charts.CHARTS)
    assert not re.search(r'(src|href)="(?!data:)', html)  # nothing loaded from beside or outside the file
    assert "<style>" in html


def test_md_references_the_chart_files_beside_it(rendered):
    suite_dir, _ = rendered
    md = (suite_dir / "report.md").read_text()
    referenced = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert sorted(referenced) == sorted(charts.CHARTS)
    assert all((suite_dir / name).is_file() for name in referenced)


def test_report_lists_skipped_files_by_name(rendered):
    suite_dir, _ = rendered
    for report in ("report.md", "report.html"):
        text = (suite_dir / report).read_text()
        assert "runs/corrupt.json" in text and "runs/foreign.json" in text


def test_report_shows_environment_and_computed_findings(rendered):
    suite_dir, _ = rendered
    md = (suite_dir / "report.md").read_text()
    assert "| device_name | NVIDIA H100 80GB HBM3 (fixture) |" in md
    assert "| torch | 2.13.0+cu128 |" in md
    records, _ = load_runs(suite_dir)
    for finding in findings.findings(records):
        assert f"- {finding}" in md


def test_charts_without_data_are_neither_written_nor_referenced(tmp_path):
    suite_dir = copy_suite(tmp_path / "suite")
    for path in (suite_dir / "runs").glob("*.json"):
        if path.stem not in ("4gpu-tp4", "2gpu-full"):
            path.unlink()
    (suite_dir / "throughput.png").write_bytes(b"stale chart from an earlier render")
    written, _ = render_report(suite_dir)
    assert not any(name.endswith(".png") for name in written)
    assert not list(suite_dir.glob("*.png"))
    md, html = (suite_dir / "report.md").read_text(), (suite_dir / "report.html").read_text()
    assert "![" not in md and "<img" not in html
    assert "No run finished with a throughput" in md
    assert md.startswith("# gptbench report: suite\n")


def test_a_chart_is_left_out_when_no_run_has_its_metric(tmp_path):
    records, _ = load_runs(copy_suite(tmp_path / "suite"))
    for record in records:
        if record["metrics"]:
            record["metrics"]["roofline"] = None
    assert charts.roofline_chart(records) is None
    assert charts.throughput_chart(records) is not None


def test_charts_are_pure_functions_of_the_records(rendered):
    suite_dir, written = rendered
    records, _ = load_runs(suite_dir)
    snapshot = json.dumps(records, sort_keys=True)
    assert charts.chart_pngs(records) == {name: written[name].read_bytes() for name in charts.CHARTS}
    assert json.dumps(records, sort_keys=True) == snapshot


def test_findings_pick_the_best_configuration(tmp_path):
    records, _ = load_runs(copy_suite(tmp_path / "suite"))
    assert findings.best_by_throughput(records)["run_id"] == "4gpu-dp4"
    faster = next(r for r in records if r["run_id"] == "4gpu-tp2-dp2")
    faster["metrics"]["throughput_tokens_per_s"] = 700.0
    assert findings.best_by_throughput(records)["run_id"] == "4gpu-tp2-dp2"


def test_findings_say_where_scaling_is_lost_and_why(tmp_path):
    records, _ = load_runs(copy_suite(tmp_path / "suite"))
    assert [r["run_id"] for r in findings.scaling_losses(records)] == \
        ["2gpu-tp2", "2gpu-pp2", "4gpu-tp2-dp2", "4gpu-pp2-dp2", "4gpu-tp2-pp2"]
    sentences = findings.findings(records)
    # One line per strategy: from the time breakdown where the record has one, else from
    # the older shares, saying that they include waiting.
    assert ("Scaling lost: tensor_data_hybrid: 2 ranks (2gpu-tp2) efficiency 56%: 41% communication, "
            "21% waiting, 38% compute; 4 ranks (4gpu-tp2-dp2) efficiency 55%: communication share 43% "
            "(includes waiting for peers) (shares of a profiled batch).") in sentences
    assert [s.split(":")[1].strip() for s in sentences if s.startswith("Scaling lost")] == \
        ["tensor_data_hybrid", "pipeline_data_hybrid", "full_model_parallel"]
    assert not any("timed region" in s for s in sentences)  # the shares come from a separate batch
    assert not any("4gpu-dp4" in s and "Scaling lost" in s for s in sentences)


def test_findings_name_parity_failures(tmp_path):
    records, _ = load_runs(copy_suite(tmp_path / "suite"))
    assert [r["run_id"] for r in findings.parity_failures(records)] == ["4gpu-tp2-pp2"]
    sentence = next(s for s in findings.findings(records) if s.startswith("Parity broken"))
    assert "4gpu-tp2-pp2" in sentence and "0.0781 > tolerance 0.05" in sentence




# ---- bad records are skipped for their own reason; the rest renders --------------------------

def test_a_value_of_the_wrong_type_skips_that_file_and_the_rest_renders(tmp_path, capsys):
    from gptbench import cli

    suite_dir = copy_suite(tmp_path / "suite")
    edit(suite_dir, "2gpu-dp2", lambda r: r["metrics"].update(throughput_tokens_per_s="fast"))
    broken_copy = json.loads((suite_dir / "runs" / "4gpu-dp4.json").read_text())
    broken_copy["metrics"]["ttft_ms"]["p50"] = "slow"
    (suite_dir / "runs" / "aa-copy.json").write_text(json.dumps(broken_copy))  # sorts before 4gpu-dp4
    assert cli.main(["report", str(suite_dir)]) == 0
    err = capsys.readouterr().err
    assert f"gptbench: skipped {suite_dir / 'runs' / '2gpu-dp2.json'}: metrics.throughput_tokens_per_s is " \
           '"fast" (str), expected a number or null' in err
    assert "aa-copy.json: metrics.ttft_ms.p50 is \"slow\" (str)" in err and "duplicate" not in err
    assert "corrupt.json: not valid JSON" in err and "foreign.json: schema is" in err
    md = (suite_dir / "report.md").read_text()
    assert "- `runs/2gpu-dp2.json`: metrics.throughput_tokens_per_s is \"fast\"" in md
    assert "| 4gpu-dp4 | pure_data_parallel | 4 |" in md and "| 2gpu-dp2 |" not in md


# ---- derived at read time ----------------------------------------------------------------------

def test_speedups_follow_the_baseline_in_the_folder_not_the_stored_ones(tmp_path):
    suite_dir = copy_suite(tmp_path / "suite")
    edit(suite_dir, "1gpu-dp1", lambda r: r["metrics"].update(throughput_tokens_per_s=200.0))
    records, _ = load_runs(suite_dir)
    tp2 = next(r for r in records if r["run_id"] == "2gpu-tp2")
    assert tp2["metrics"]["speedup"] == pytest.approx(181.6 / 200.0)  # the file still says 1.127
    assert tp2["metrics"]["parallel_efficiency"] == pytest.approx(181.6 / 200.0 / 2)
    assert [r["metrics"]["scaling"] for r in records if r["status"] == "ok"] == \
        ["baseline", "weak", "strong", "strong", "weak", "weak", "weak", "strong"]


def test_without_a_matching_baseline_speedups_are_dashes_with_the_reason(tmp_path):
    suite_dir = copy_suite(tmp_path / "suite")
    edit(suite_dir, "1gpu-dp1", lambda r: r["env"].update(device_name="NVIDIA A10 (fixture)"))
    render_report(suite_dir)
    md = (suite_dir / "report.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| 2gpu-tp2 | tensor_data_hybrid"))
    assert "| 181.6 | — | — | strong |" in row
    assert "`metrics.speedup`: no finished 1-rank run in this folder with the same device" in md


# ---- the recommendation, the setup, the findings ---------------------------------------------

def test_the_report_opens_with_the_recommendation(rendered):
    suite_dir, _ = rendered
    md = (suite_dir / "report.md").read_text()
    headings = [line for line in md.splitlines() if line.startswith("## ")]
    assert headings[:2] == ["## Recommendation", "## Findings"]
    html = (suite_dir / "report.html").read_text()
    assert html.index('<section id="recommendation">') < html.index("<h2>Findings</h2>")


def test_the_recommendation_names_the_best_per_rank_count_by_how_much_and_why(tmp_path):
    from gptbench.report.recommend import recommendations

    records, _ = load_runs(copy_suite(tmp_path / "suite"))
    sentences = recommendations(records)
    assert sentences[0].startswith("1 rank: pure_data_parallel (1gpu-dp1), 161.2 tokens/s, the only configuration")
    assert sentences[1] == (
        "2 ranks: pure_data_parallel (2gpu-dp2), 317.3 tokens/s, 1.75x the next best, tensor_data_hybrid "
        "(2gpu-tp2), 1.97x one rank (weak scaling). Why: tensor_data_hybrid (2gpu-tp2) loses: 41% communication, "
        "21% waiting, 38% compute; pipeline_data_hybrid (2gpu-pp2) loses: 6% communication, 48% waiting, "
        "46% compute; 2gpu-dp2 itself: 1% communication, 2% waiting, 97% compute.")
    assert sentences[2].startswith("4 ranks: pure_data_parallel (4gpu-dp4)")
    assert "4gpu-tp2-pp2" not in sentences[2]  # its tokens differ: never recommended
    assert sentences[3] == "Left out because their tokens or logits differ from the reference: 4gpu-tp2-pp2."


def test_the_recommendation_is_a_table_per_rank_count_above_the_prose(rendered):
    suite_dir, records = rendered
    md = (suite_dir / "report.md").read_text()
    section = md[md.index("## Recommendation"):md.index("## Findings")]
    assert section.index("| Ranks | Best configuration |") < section.index("- 1 rank: ")
    assert ("| 2 | pure_data_parallel (2gpu-dp2) | 317.3 | 1.97x (weak) | tensor_data_hybrid "
            "(2gpu-tp2), 181.6 tokens/s | 1.75x behind: 41% communication, 21% waiting, "
            "38% compute |") in section
    assert "| 1 | pure_data_parallel (1gpu-dp1) | 161.2 | baseline | — | the only configuration" in section
    html = (suite_dir / "report.html").read_text()
    box = html[html.index('<section id="recommendation">'):html.index("</section>")]
    assert box.index("<table>") < box.index("<ul>")


def test_byte_figures_take_a_unit_that_shows_them(tmp_path):
    from gptbench.report.charts import byte_unit
    from gptbench.report.render import memory_text

    assert byte_unit(3 * 2**30) == ("GiB", 2**30) and byte_unit(5 * 2**20) == ("MiB", 2**20)
    assert byte_unit(2048) == ("KiB", 1024) and byte_unit(10) == ("B", 1)
    assert memory_text([12_845_056, 6_422_528]) == "12.25 / 6.12 MiB"  # not "0.01 / 0.01 GiB"


def test_setup_shows_what_runs_share_once_and_what_differs_beside_each_run(tmp_path):
    suite_dir = copy_suite(tmp_path / "suite")
    edit(suite_dir, "4gpu-dp4", lambda r: r["engine"].update(threads_per_rank=2))
    render_report(suite_dir)
    md = (suite_dir / "report.md").read_text()
    setup = md.split("## Setup")[1].split("## Environment")[0]
    assert "| model.n_layer | 48 |" in setup and "| workload.batch_size | 4 |" in setup
    assert "engine.threads_per_rank |" not in setup  # not shared, so not in the shared table
    assert "- 4gpu-dp4: `engine.threads_per_rank` = 2" in setup
    assert "- 2gpu-tp2: `engine.threads_per_rank` = 1" in setup
    assert "| engine.compile | off (not recorded by 4 run(s)) |" in setup
    assert ", —" not in setup and "1, 2" not in setup
    html = (suite_dir / "report.html").read_text()
    assert "<tr><td>4gpu-dp4</td><td>2</td></tr>" in html


def cpu_run(record, threads=1, cores=2):
    record["env"].update(device="cpu", cpus_usable=cores)
    record["engine"]["threads_per_rank"] = threads


def test_findings_say_when_ranks_crowd_too_few_cores(tmp_path):
    suite_dir = copy_suite(tmp_path / "suite")
    for path in (suite_dir / "runs").glob("*pu-*.json"):
        edit(suite_dir, path.stem, cpu_run)
    records, _ = load_runs(suite_dir)
    sentences = findings.findings(records)
    crowded = [s for s in sentences if "share 2 CPU cores" in s]
    assert [s.split(":")[1].strip() for s in crowded] == \
        ["tensor_data_hybrid", "pipeline_data_hybrid", "full_model_parallel"]
    assert "4 ranks x 1 thread(s) share 2 CPU cores, so part of the loss is ranks waiting for a core" in crowded[0]
    from gptbench.report.recommend import recommendations
    assert "4 ranks x 1 thread(s) share 2 CPU cores" in recommendations(records)[2]
    assert "share 2 CPU cores" not in recommendations(records)[1]  # 2 ranks x 1 thread fit


def test_memory_shows_model_bytes_beside_the_measured_kind(rendered):
    md = (rendered[0] / "report.md").read_text()
    assert "| 2gpu-tp2 | 1.63 / 1.63 GiB | 1.70 / 1.68 GiB (CUDA peak allocated) |" in md
    assert "| 4gpu-dp4 | — | 3.19 / 3.19 / 3.19 / 3.19 GiB (CUDA peak allocated) |" in md


def test_rss_is_labelled_as_a_whole_process(tmp_path):
    suite_dir = copy_suite(tmp_path / "suite")
    edit(suite_dir, "1gpu-dp1", lambda r: r["metrics"]["peak_memory_bytes"].update(kind="rss"))
    render_report(suite_dir)
    assert "| 1gpu-dp1 | 3.27 GiB | 3.19 GiB (RSS, whole process) |" in (suite_dir / "report.md").read_text()


def test_breakdown_and_predicted_tpot_are_shown_where_recorded(rendered):
    md = (rendered[0] / "report.md").read_text()
    assert "| 2gpu-tp2 | 31.0 | 34.7 | 21.8 | 23.8 | 17.4 | 1.25 | 38% / 41% / 21% | 41.0% | — |" in md
    assert "| 4gpu-dp4 | 39.1 | 43.8 | 25.3 | 27.6 | — | — | — | 0.6% | — |" in md


def test_new_charts_need_their_fields(tmp_path):
    records, _ = load_runs(copy_suite(tmp_path / "suite"))
    assert charts.breakdown_chart(records) is not None and charts.predicted_tpot_chart(records) is not None
    for record in records:
        if record["metrics"]:
            record["metrics"].pop("time_breakdown", None)
            record["metrics"].pop("predicted", None)
    assert charts.breakdown_chart(records) is None and charts.predicted_tpot_chart(records) is None


def test_graph_breaks_and_nodes_are_named(tmp_path):
    suite_dir = copy_suite(tmp_path / "suite")

    def compiled(record):
        record["engine"]["compile"] = "default"
        record["metrics"]["graph_breaks"] = 3
        record["metrics"]["compile"] = {"graphs": 4, "graphs_while_measuring": 1}
        record["topology"]["nodes"] = 2
    edit(suite_dir, "2gpu-dp2", compiled)
    render_report(suite_dir)
    md = (suite_dir / "report.md").read_text()
    assert ("- 2gpu-dp2, `metrics.graph_breaks`: 3 graph break(s) in the compiled decode step "
            "(engine.compile default): those parts ran eagerly") in md
    assert ("Graph breaks: pure_data_parallel compiled its decode step with graph breaks "
            "(2gpu-dp2 3 (engine.compile default))") in md
    assert ("- 2gpu-dp2, `metrics.compile.graphs_while_measuring`: 1 graph(s) compiled inside the measured "
            "region: its timings include compilation") in md
    assert "| 2gpu-dp2 | pure_data_parallel | 2 | dp2 tp1 pp1 on 2 nodes |" in md


def test_notes_name_every_run_once_per_reason(rendered):
    md = (rendered[0] / "report.md").read_text()
    assert ("- 1gpu-dp1, 2gpu-dp2, 2gpu-tp2, 4gpu-dp4, 4gpu-tp2-dp2, `metrics.bubble_fraction`: "
            "no pipeline stages (pp=1)") in md
    assert "- 1gpu-dp1, 2gpu-dp2, 2gpu-tp2, 2gpu-pp2, `metrics.time_breakdown`: one profiled batch" in md


def test_a_speedup_beyond_linear_is_called_suspect(tmp_path):
    suite_dir = copy_suite(tmp_path / "suite")
    edit(suite_dir, "1gpu-dp1", lambda r: r["metrics"].update(throughput_tokens_per_s=100.0))
    records, _ = load_runs(suite_dir)
    assert [r["run_id"] for r in findings.superlinear(records)] == ["2gpu-dp2", "4gpu-dp4"]
    sentence = next(s for s in findings.findings(records) if s.startswith("More than linear"))
    assert sentence.startswith("More than linear speedup (2gpu-dp2 159%, 4gpu-dp4 156%): usually the baseline "
                               "(1gpu-dp1) ran slower than it can")
    assert "--only 1gpu-dp1" in sentence


def test_latency_axes_fit_their_bars(tmp_path):
    """One slow p99 beside medians of a few ms: the axis turns logarithmic, so the short bars
    still show, and every bar lies inside the axis; a narrow spread keeps a linear axis."""
    suite_dir = copy_suite(tmp_path / "suite")
    records, _ = load_runs(suite_dir)
    ttft_ax, tpot_ax = charts.latency_chart(records).axes[:2]
    for ax, metric in ((ttft_ax, "ttft_ms"), (tpot_ax, "tpot_ms")):
        values = [v for r in records if r["status"] == "ok" and value_at(r, f"metrics.{metric}")
                  for v in (r["metrics"][metric].get(q) for q in ("p50", "p90", "p99")) if v]
        low, high = ax.get_ylim()
        assert low <= min(values) and high >= max(values)
        assert ax.get_yscale() == ("log" if max(values) / min(values) > charts.LOG_AXIS_ABOVE else "linear")
    slow = next(r for r in records if r["status"] == "ok" and value_at(r, "metrics.tpot_ms"))
    slow["metrics"]["tpot_ms"]["p99"] = 600 * max(
        v for r in records if r["status"] == "ok" and value_at(r, "metrics.tpot_ms")
        for v in (r["metrics"]["tpot_ms"]["p50"],))
    tpot_ax = charts.latency_chart(records).axes[1]
    assert tpot_ax.get_yscale() == "log" and tpot_ax.get_ylim()[1] >= slow["metrics"]["tpot_ms"]["p99"]


def test_utilisation_is_labelled_kernel_resident_beside_the_stages_work(rendered):
    from gptbench.report.render import util_text

    suite_dir, _ = rendered
    assert "GPU kernel-resident (not work)" in (suite_dir / "report.md").read_text()
    assert "GPU kernel-resident (not work)" in (suite_dir / "report.html").read_text()
    assert util_text(97.0, [0.5, None, 0.7]) == "97.0% · stage busy 60%"
    assert util_text(None, None) == "—"


# ---- intervals, validity and energy --------------------------------------------------------

def with_interval(low, high):
    def edit_record(record):
        record["metrics"]["intervals"] = {"throughput_tokens_per_s": [low, high]}
    return edit_record


def test_the_recommendation_says_when_the_best_two_cannot_be_told_apart(tmp_path):
    from gptbench.report.recommend import recommendations

    suite_dir = copy_suite(tmp_path / "suite")
    # 4 ranks: dp4 624.6 and tp2-dp2 353.4 apart; 2 ranks: dp2 317.3 and tp2 181.6 made to overlap
    edit(suite_dir, "2gpu-dp2", with_interval(150.0, 480.0))
    edit(suite_dir, "2gpu-tp2", with_interval(100.0, 330.0))
    edit(suite_dir, "4gpu-dp4", with_interval(610.0, 640.0))
    edit(suite_dir, "4gpu-tp2-dp2", with_interval(340.0, 366.0))
    sentences = recommendations(load_runs(suite_dir)[0])
    assert sentences[1].startswith("2 ranks: pure_data_parallel (2gpu-dp2), 317.3 ± 165.0 tokens/s, "
                                   "1.75x the next best, tensor_data_hybrid (2gpu-tp2), but 2gpu-dp2 and "
                                   "2gpu-tp2 are not distinguishable on this machine")
    assert sentences[2].startswith("4 ranks: pure_data_parallel (4gpu-dp4), 624.6 ± 15.0 tokens/s")
    assert "not distinguishable" not in sentences[2]
    # one interval only: nothing can be said either way
    edit(suite_dir, "2gpu-tp2", lambda r: r["metrics"].pop("intervals"))
    assert "not distinguishable" not in recommendations(load_runs(suite_dir)[0])[1]


def test_invalid_runs_are_flagged_with_their_reasons_and_intervals_show_as_plus_minus(tmp_path):
    suite_dir = copy_suite(tmp_path / "suite")

    def invalid(record):
        record["metrics"]["validity"] = {"verdict": "invalid", "reasons": [
            "pass-to-pass throughput CV 31.0 % above workload.max_cv_pct 10 %"], "checks": {}}
        record["metrics"]["intervals"] = {"throughput_tokens_per_s": [600.0, 650.0],
                                          "ttft_ms_p50": [100.0, 104.0]}
    edit(suite_dir, "4gpu-dp4", invalid)
    edit(suite_dir, "2gpu-dp2", lambda r: r["metrics"].update(
        validity={"verdict": "valid", "reasons": [], "checks": {}}))
    render_report(suite_dir)
    md = (suite_dir / "report.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| 4gpu-dp4 | pure_data"))
    assert "| INVALID: pass-to-pass throughput CV 31.0 % above workload.max_cv_pct 10 % | 624.6 ± 25.0 |" in row
    assert next(line for line in md.splitlines() if line.startswith("| 2gpu-dp2 | pure_data")).count("| valid |") == 1
    latency_row = [line for line in md.splitlines() if line.startswith("| 4gpu-dp4 |")][1]
    assert " ± 2.0 |" in latency_row
    html = (suite_dir / "report.html").read_text()
    assert '<tr class="invalid"><td>4gpu-dp4</td>' in html
    rows = list(csv.DictReader((suite_dir / "summary.csv").open()))
    dp4 = next(r for r in rows if r["run_id"] == "4gpu-dp4")
    assert dp4["validity"] == "invalid" and dp4["throughput_tokens_per_s_ci95"] == "600 650"


def test_energy_columns_and_chart_from_the_records_that_have_it(rendered):
    suite_dir, written = rendered
    md = (suite_dir / "report.md").read_text()
    # fixture: 2 GPUs, 5930.5 + 5977.9 J over 24.206 s for 7680 tokens
    assert "| 11908.4 | 492.0 | 1.55 |" in md
    assert "energy.png" in written
    assert charts.energy_chart([r for r in load_runs(suite_dir)[0] if r["run_id"] != "1gpu-dp1"
                                and r["run_id"] != "2gpu-dp2"]) is None  # no energy: no chart
