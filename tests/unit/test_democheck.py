"""CI's check of `make demo`: a row that should be ok and is not, a parity failure or a
missing record fails it; rows that cannot be formed must be recorded not_applicable."""
import os

import pytest

from gptbench import democheck, results
from paths import TINY_CPU as BASE


@pytest.fixture
def suite(tmp_path):
    path = tmp_path / "demo.yaml"
    path.write_text(f"title: t\nbase: {BASE}\nruns:\n"
                    "  - {id: 1r-dp, ranks: 1, set: {strategy: dp}}\n"
                    "  - {id: 2r-full, ranks: 2, set: {strategy: full}}\n", encoding="utf-8")
    return str(path), str(tmp_path / "out")


def _write(out, run_id, status, passed=True):
    record = {"schema": results.SCHEMA, "run_id": run_id, "status": status, "error": None,
              "metrics": {"throughput_tokens_per_s": 1.0} if status == "ok" else None,
              "parity": {"passed": passed, "tokens_match": passed, "max_abs_logit_diff": 0.0,
                         "tolerance": 1e-4} if status == "ok" else None}
    results.write_json_atomic(results.run_path(out, run_id), record)


def test_a_complete_demo_passes(suite, capsys):
    path, out = suite
    _write(out, "1r-dp", "ok")
    _write(out, "2r-full", "not_applicable")
    assert democheck.main([path, out]) == 0
    assert "1 ok with parity passed, 1 not applicable" in capsys.readouterr().out


@pytest.mark.parametrize("dp_status, passed, full_status, needle", [
    ("failed", True, "not_applicable", "1r-dp: failed where ok was expected"),
    ("ok", False, "not_applicable", "1r-dp: parity not passed"),
    (None, True, "not_applicable", "1r-dp: no readable record"),
    ("ok", True, "ok", "2r-full: ok where not_applicable was expected"),
])
def test_each_kind_of_problem_fails_the_check(suite, capsys, dp_status, passed, full_status,
                                              needle):
    path, out = suite
    if dp_status:
        _write(out, "1r-dp", dp_status, passed)
    _write(out, "2r-full", full_status)
    assert democheck.main([path, out]) == 1
    assert needle in capsys.readouterr().err


def test_ci_runs_the_demo_and_its_check_after_the_tests(root):
    with open(os.path.join(root, ".ci", "run"), encoding="utf-8") as f:
        steps = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    order = [next(i for i, s in enumerate(steps) if s.startswith(prefix))
             for prefix in ("make test", "make demo", ".venv/bin/python -m gptbench.democheck")]
    assert order == sorted(order), steps
