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

FIXTURE_SUITE = Path(__file__).parent / "fixtures" / "suite"
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
    return suite_dir, render_report(suite_dir, title=TITLE)


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
    assert ("zz-copy.json", "duplicate run_id '4gpu-dp4'") in [(p.name, reason) for p, reason in skipped]


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
    assert cells == ["4gpu-tp2-dp2", "tensor_data_hybrid", "4", "dp2 tp2 pp1", "ok", "353.4", "2.19x", "54.8%",
                     "1457.5", "47.0%"]


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
    written = render_report(suite_dir)
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
    assert {ws: r["run_id"] for ws, r in findings.best_per_world_size(records).items()} == \
        {1: "1gpu-dp1", 2: "2gpu-dp2", 4: "4gpu-dp4"}
    faster = next(r for r in records if r["run_id"] == "4gpu-tp2-dp2")
    faster["metrics"]["throughput_tokens_per_s"] = 700.0
    assert findings.best_by_throughput(records)["run_id"] == "4gpu-tp2-dp2"
    assert findings.best_per_world_size(records)[4]["run_id"] == "4gpu-tp2-dp2"


def test_findings_say_where_scaling_is_lost_and_why(tmp_path):
    records, _ = load_runs(copy_suite(tmp_path / "suite"))
    assert [r["run_id"] for r in findings.scaling_losses(records)] == \
        ["2gpu-tp2", "2gpu-pp2", "4gpu-tp2-dp2", "4gpu-pp2-dp2", "4gpu-tp2-pp2"]
    sentences = findings.findings(records)
    assert ("Scaling lost: tensor_data_hybrid at 4 ranks (4gpu-tp2-dp2): efficiency 55%, "
            "communication 43% of the timed region.") in sentences
    assert any(s.startswith("Scaling lost: pipeline_data_hybrid at 2 ranks (2gpu-pp2): efficiency 46%, "
                            "pipeline bubble 48%") for s in sentences)
    assert not any("4gpu-dp4" in s and "Scaling lost" in s for s in sentences)


def test_findings_name_parity_failures(tmp_path):
    records, _ = load_runs(copy_suite(tmp_path / "suite"))
    assert [r["run_id"] for r in findings.parity_failures(records)] == ["4gpu-tp2-pp2"]
    sentence = next(s for s in findings.findings(records) if s.startswith("Parity broken"))
    assert "4gpu-tp2-pp2" in sentence and "0.0781 > tolerance 0.05" in sentence
