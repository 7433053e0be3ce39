"""Config: defaults < YAML < --set, and every bad input is a UserError naming its key."""
import dataclasses
import os
import textwrap

import pytest

from gptbench.config import RunConfig, load_config, parse_overrides
from gptbench.errors import UserError
from paths import CONFIGS


def write(tmp_path, text: str, name: str = "bench.yaml") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return str(path)


def error_of(path, sets=()) -> str:
    with pytest.raises(UserError) as e:
        load_config(path, list(sets))
    return str(e.value)


# ---- precedence -------------------------------------------------------------------------

def test_no_file_no_overrides_gives_the_dataclass_defaults():
    assert load_config(None, []) == RunConfig()


def test_yaml_overrides_defaults_and_set_overrides_yaml(tmp_path):
    path = write(tmp_path, """
        strategy: pp
        workload:
          batch_size: 2
          num_samples: 8
          input_len: 16
        topology:
          pp: 2
    """)
    cfg = load_config(path, ["workload.input_len=32", "topology.pp=4", "strategy=full"])
    assert cfg.workload.batch_size == 2           # YAML
    assert cfg.workload.num_samples == 8          # YAML
    assert cfg.workload.input_len == 32           # --set beats YAML
    assert cfg.topology.pp == 4
    assert cfg.strategy == "full_model_parallel"  # alias, --set beats YAML
    assert cfg.workload.output_len == RunConfig().workload.output_len  # default kept
    assert cfg.topology.partition_method == "parameters"


def test_set_alone_merges_into_sections_without_dropping_siblings():
    cfg = load_config(None, ["workload.batch_size=2", "workload.num_samples=6"])
    assert (cfg.workload.batch_size, cfg.workload.num_samples) == (2, 6)
    assert cfg.workload.iterations == RunConfig().workload.iterations


@pytest.mark.parametrize("alias, name", [("dp", "pure_data_parallel"),
                                         ("tp", "tensor_data_hybrid"),
                                         ("pp", "pipeline_data_hybrid"),
                                         ("full", "full_model_parallel"),
                                         ("tensor_data_hybrid", "tensor_data_hybrid")])
def test_strategy_aliases(alias, name, tmp_path):
    assert load_config(None, [f"strategy={alias}"]).strategy == name
    assert load_config(write(tmp_path, f"strategy: {alias}\n"), []).strategy == name


def test_set_values_are_yaml_typed():
    cfg = load_config(None, ["model.tie_embeddings=false", "engine.comm_timeout_s=7.5",
                             "topology.tp=null", "model.name=gpt2-medium", "timeout_s=60",
                             "workload.dataset="])
    assert cfg.model.tie_embeddings is False
    assert cfg.engine.comm_timeout_s == 7.5
    assert cfg.topology.tp is None
    assert cfg.model.name == "gpt2-medium"
    assert cfg.timeout_s == 60.0 and isinstance(cfg.timeout_s, float)  # int accepted as float
    assert cfg.workload.dataset is None


def test_last_set_of_a_key_wins():
    cfg = load_config(None, ["workload.input_len=8", "workload.input_len=16"])
    assert cfg.workload.input_len == 16


def test_overrides_parse_to_a_nested_tree():
    assert parse_overrides(["a.b.c=3", "a.d=x", "e=[1, 2]"]) == {
        "a": {"b": {"c": 3}, "d": "x"}, "e": [1, 2]}


def test_config_is_frozen():
    cfg = load_config(None, [])
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.workload.batch_size = 8


# ---- errors -----------------------------------------------------------------------------

def test_unknown_top_level_key_lists_the_allowed_ones(tmp_path):
    msg = error_of(write(tmp_path, "stratgy: dp\n"))
    assert "'stratgy'" in msg
    for allowed in ("strategy", "workload", "topology", "model", "output_dir"):
        assert allowed in msg


def test_unknown_nested_key_names_the_dotted_key_and_siblings():
    msg = error_of(None, ["workload.batchsize=4"])
    assert "'workload.batchsize'" in msg
    for allowed in ("workload.batch_size", "workload.input_len", "workload.num_samples"):
        assert allowed in msg


def test_set_through_a_scalar_is_refused():
    msg = error_of(None, ["strategy.x=1"])
    assert "strategy" in msg


@pytest.mark.parametrize("setting, key", [
    ("workload.batch_size=four", "workload.batch_size"),        # str for int
    ("workload.batch_size=true", "workload.batch_size"),        # bool is not an int
    ("workload.batch_size=2.0", "workload.batch_size"),         # float is not an int
    ("workload.batch_size=null", "workload.batch_size"),        # null for a required int
    ("model.tie_embeddings=1", "model.tie_embeddings"),         # int is not a bool
    ("engine.comm_timeout_s=soon", "engine.comm_timeout_s"),    # str for float
    ("engine.comm_timeout_s=true", "engine.comm_timeout_s"),    # bool is not a float
    ("model.name=3", "model.name"),                             # int for str
    ("topology.tp=two", "topology.tp"),                         # str for Optional[int]
    ("workload=3", "workload"),                                 # scalar for a section
])
def test_wrong_types_name_the_key(setting, key):
    msg = error_of(None, [setting])
    assert msg.startswith(key + ":"), msg


def test_wrong_type_in_yaml_names_the_key(tmp_path):
    msg = error_of(write(tmp_path, "workload:\n  iterations: '3'\n"))
    assert "workload.iterations" in msg and "int" in msg


@pytest.mark.parametrize("key", ["workload.batch_size", "workload.input_len",
                                 "workload.output_len", "workload.iterations",
                                 "topology.tp", "topology.pp", "topology.micro_batches",
                                 "topology.world_size", "parity.samples", "parity.tokens",
                                 "engine.threads", "timeout_s"])
@pytest.mark.parametrize("value", [0, -1])
def test_non_positive_sizes(key, value):
    msg = error_of(None, [f"{key}={value}"])
    assert key in msg and "positive" in msg


def test_negative_warmup_refused_zero_allowed():
    assert load_config(None, ["workload.warmup=0"]).workload.warmup == 0
    assert "workload.warmup" in error_of(None, ["workload.warmup=-1"])


def test_min_duration_and_max_cv_are_checked():
    cfg = load_config(None, ["workload.min_duration_s=10", "workload.max_cv_pct=5"])
    assert (cfg.workload.min_duration_s, cfg.workload.max_cv_pct) == (10.0, 5.0)
    assert load_config(None, []).workload.min_duration_s == 0.0  # iterations alone by default
    assert "workload.min_duration_s: must be >= 0" in error_of(None, ["workload.min_duration_s=-1"])
    assert "workload.max_cv_pct: must be positive" in error_of(None, ["workload.max_cv_pct=0"])


@pytest.mark.parametrize("key, bad, good", [
    ("workload.dtype", "fp16", "float16"),
    ("model.weights", "randomised", "random"),
    ("engine.device", "gpu", "cuda"),
    ("topology.partition_method", "type:Block", "uniform"),
    ("strategy", "zero3", "dp"),
    ("engine.backend", "vllm", "hf_eager"),
])
def test_invalid_choices_list_the_allowed_values(key, bad, good):
    msg = error_of(None, [f"{key}={bad}"])
    assert key in msg and bad in msg
    load_config(None, [f"{key}={good}"])  # the allowed value passes


def test_num_samples_must_be_a_multiple_of_batch_size():
    msg = error_of(None, ["workload.batch_size=4", "workload.num_samples=10"])
    assert "workload.num_samples" in msg and "workload.batch_size" in msg and "10" in msg
    assert load_config(None, ["workload.batch_size=4", "workload.num_samples=12"])


def test_parity_samples_at_most_batch_size():
    msg = error_of(None, ["workload.batch_size=2", "workload.num_samples=4",
                          "parity.samples=3"])
    assert "parity.samples" in msg and "3" in msg
    assert load_config(None, ["workload.batch_size=2", "workload.num_samples=4",
                              "parity.samples=2"]).parity.samples == 2


def test_parity_probe_defaults_to_one_whole_batch():
    assert load_config(None, []).parity.samples is None
    assert load_config(None, []).parity.tokens == 8


def test_preset_needs_random_weights():
    assert "model.preset" in error_of(None, ["model.preset=tiny"])
    assert "model.preset" in error_of(None, ["model.preset=huge", "model.weights=random"])


def test_missing_file_names_the_path(tmp_path):
    missing = str(tmp_path / "nope.yaml")
    msg = error_of(missing)
    assert missing in msg


def test_missing_dataset_names_the_key(tmp_path):
    msg = error_of(None, [f"workload.dataset={tmp_path / 'none.jsonl'}"])
    assert "workload.dataset" in msg


def test_malformed_yaml_gives_the_line(tmp_path):
    path = write(tmp_path, "strategy: dp\nworkload:\n  batch_size: 4\n  input_len: 3\n"
                           "   bad: 4\nmodel:\n  name: x\n")
    msg = error_of(path)
    assert msg.startswith(f"{path}:5:"), msg  # the stray mapping on line 5


def test_malformed_yaml_tab_indent_line(tmp_path):
    path = write(tmp_path, "strategy: dp\nworkload:\n\tbatch_size: 4\n")
    assert f"{path}:3:" in error_of(path)


def test_top_level_must_be_a_mapping(tmp_path):
    path = write(tmp_path, "- strategy\n- dp\n")
    assert path in error_of(path)


@pytest.mark.parametrize("pair", ["workload.batch_size", "=3", ""])
def test_set_without_key_value(pair):
    msg = error_of(None, [pair])
    assert "key=value" in msg


# ---- shipped configs --------------------------------------------------------------------

def test_tiny_cpu_yaml_loads_and_runs_any_strategy(tiny_cpu):
    path = tiny_cpu
    cfg = load_config(path, [])
    assert (cfg.model.preset, cfg.model.weights, cfg.engine.device) == ("tiny", "random", "cpu")
    assert cfg.workload.dtype == "float32"
    for alias in ("dp", "tp", "pp", "full"):
        load_config(path, [f"strategy={alias}"])


def test_gpt2_xl_gpu_yaml_loads():
    cfg = load_config(os.path.join(CONFIGS, "gpt2-xl-gpu.yaml"), [])
    assert (cfg.model.name, cfg.model.weights) == ("gpt2-xl", "pretrained")
    assert (cfg.workload.dtype, cfg.engine.device) == ("float16", "cuda")
    w = cfg.workload
    assert (w.batch_size, w.input_len, w.output_len) == (4, 256, 64)


def test_unknown_strategy_lists_the_aliases_too():
    msg = error_of(None, ["strategy=zero3"])
    assert ("is not one of pure_data_parallel (dp), tensor_data_hybrid (tp), pipeline_data_hybrid (pp), "
            "full_model_parallel (full)") in msg


@pytest.mark.parametrize("text, line, first, second", [
    ("strategy: dp\nworkload:\n  batch_size: 4\nstrategy: tp\n", 4, 1, 4),
    ("workload:\n  batch_size: 4\n  input_len: 8\n  batch_size: 2\n", 4, 2, 4),
])
def test_a_key_given_twice_is_refused_with_both_lines(tmp_path, text, line, first, second):
    path = write(tmp_path, text)
    msg = error_of(path)
    assert msg.startswith(f"{path}:{line}: ") and f"given twice (lines {first} and {second})" in msg


def test_a_suite_with_a_key_given_twice_is_refused(tmp_path):
    from gptbench.suite import load_suite

    path = write(tmp_path, "base: x.yaml\nruns: []\nbase: y.yaml\n", "suite.yaml")
    with pytest.raises(UserError, match=r"suite\.yaml:3: .*'base' is given twice \(lines 1 and 3\)"):
        load_suite(path)
