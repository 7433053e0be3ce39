"""The collective watchdog's timeout: `engine.comm_timeout_s: auto` is chosen from the
device and the predicted (or measured) compile time of the ranks compiling at once."""
import pytest

from gptbench import watchdog
from gptbench.config import load_config
from gptbench.errors import UserError
from gptbench.runplan import resolve


def test_auto_is_the_default_and_a_number_still_wins():
    assert load_config(None, []).engine.comm_timeout_s == "auto"
    assert load_config(None, ["engine.comm_timeout_s=auto"]).engine.comm_timeout_s == "auto"
    assert load_config(None, ["engine.comm_timeout_s=45"]).engine.comm_timeout_s == 45.0
    with pytest.raises(UserError, match="^engine.comm_timeout_s: expected a number or 'auto'"):
        load_config(None, ["engine.comm_timeout_s=later"])
    with pytest.raises(UserError, match="^engine.comm_timeout_s: must be positive"):
        load_config(None, ["engine.comm_timeout_s=0"])


def test_four_xl_ranks_compiling_on_one_host_get_more_than_the_old_120_s():
    # 48 blocks at 77/48 s each = 77 s alone; 4 ranks x min(32, 16) workers on 16 cores: x4
    seconds, why = watchdog.choose_comm_timeout("auto", "cuda", "reduce-overhead", 48, 1, 4, 16)
    assert seconds == pytest.approx(2 * 77 * 4)
    assert "predicted compile 77 s" in why and "x4.0 for 4 rank(s)" in why
    # with cores to spare the ranks do not slow each other: 2 x 77 s
    assert watchdog.choose_comm_timeout("auto", "cuda", "reduce-overhead", 48, 1, 4, 256)[0] \
        == pytest.approx(154)


def test_a_pipeline_stage_compiles_only_its_own_blocks():
    whole, _ = watchdog.choose_comm_timeout("auto", "cuda", "default", 48, 1, 1, 64)
    stage, why = watchdog.choose_comm_timeout("auto", "cuda", "default", 48, 2, 1, 64)
    assert stage == pytest.approx(max(120, whole / 2)) and "24 blocks" in why


def test_no_compilation_keeps_the_base_and_a_measured_time_replaces_the_prediction():
    assert watchdog.choose_comm_timeout("auto", "cuda", "off", 48, 1, 4, 16)[0] == 120
    seconds, why = watchdog.choose_comm_timeout("auto", "cuda", "reduce-overhead", 48, 1, 2,
                                                64, measured_compile_s=150.0)
    assert seconds == 300 and "measured compile 150 s" in why
    assert watchdog.choose_comm_timeout(30.0, "cuda", "reduce-overhead", 48, 1, 4, 16) == (
        30.0, "engine.comm_timeout_s set in the config")


def test_a_resolved_plan_on_cpu(monkeypatch):
    monkeypatch.setenv("LOCAL_SIZE", "2")
    plan = resolve(load_config(None, ["model.weights=random", "model.preset=tiny",
                                      "engine.device=cpu", "engine.compile=default"]), 2)
    seconds, why = watchdog.for_plan(plan)
    assert seconds >= watchdog.BASE_S and "4 blocks" in why and "2 rank(s)" in why
