"""What a failing rank writes: one line a user can act on, even when the exception has no
message (a StopIteration out of DeepSpeed's pipeline input used to read "StopIteration: ")."""
import json

from gptbench import worker
from gptbench.config import load_config
from paths import TINY_CPU as CONFIG


def _next_of_nothing():
    return next(iter([]))  # the innermost frame: this line


def _raised(fn):
    try:
        fn()
    except BaseException as e:  # noqa: BLE001
        return e
    raise AssertionError("did not raise")


def test_an_empty_message_names_the_exception_and_where_it_was_raised():
    line = worker.describe(_raised(_next_of_nothing))
    lineno = _next_of_nothing.__code__.co_firstlineno + 1
    assert line == (f"StopIteration (no message) raised at tests/unit/test_worker.py:{lineno} "
                    f"in _next_of_nothing")


def test_a_message_is_kept_on_one_line():
    def boom():
        raise ValueError("two\nlines")

    assert worker.describe(_raised(boom)) == "ValueError: two lines"


def test_the_rank_error_file_and_the_record_carry_that_line(tmp_path):
    cfg = load_config(CONFIG, [f"output_dir={tmp_path}"])
    exc = _raised(_next_of_nothing)
    try:
        raise exc
    except StopIteration as e:
        worker.fail(cfg, "r", 2, 1, e)
    with open(worker.error_path(str(tmp_path), "r", 1), encoding="utf-8") as f:
        detail = json.load(f)
    assert detail["rank"] == 1 and detail["error"].startswith("StopIteration (no message) raised at")
    with open(tmp_path / "runs" / "r.json", encoding="utf-8") as f:
        record = json.load(f)
    assert record["error"] == f"rank 1: {detail['error']}" and record["run_id"] == "r"
