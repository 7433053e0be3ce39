"""What `resolve` decides before any process starts: device, dtype, micro-batches, and the
GPU option matrix (kernel injection, CUDA graphs, hf_eager), each refusal naming its key."""
import re

import pytest
import torch

from gptbench.config import config_from_dict
from gptbench.errors import NotApplicable, UserError
from gptbench.runplan import resolve, select_device, select_dtype

TINY = {"model": {"name": "tiny", "weights": "random", "preset": "tiny"},
        "workload": {"batch_size": 4, "input_len": 16, "output_len": 4, "num_samples": 4}}


def cfg(**over):
    data = {k: dict(v) for k, v in TINY.items()}
    for dotted, value in over.items():
        section, _, key = dotted.partition("__")
        if key:
            data.setdefault(section, {})[key] = value
        else:
            data[section] = value
    return config_from_dict(data)


def test_cpu_defaults():
    plan = resolve(cfg(engine__device="cpu"), 1)
    assert plan.device == torch.device("cpu")
    assert plan.dtype == torch.float32          # auto on CPU
    assert plan.micro_batches == 1
    assert plan.run_id == "1r-dp-tp1-pp1"


def test_micro_batches_default_to_pp_and_must_divide_the_batch():
    assert resolve(cfg(strategy="pp"), 2).micro_batches == 2
    assert resolve(cfg(strategy="pp", topology__micro_batches=4), 2).micro_batches == 4
    with pytest.raises(UserError, match="micro_batches=3"):
        resolve(cfg(strategy="pp", topology__micro_batches=3), 2)
    with pytest.raises(UserError, match="pipelines only"):
        resolve(cfg(strategy="tp", topology__micro_batches=2), 2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_device_selection_without_a_gpu():
    assert select_device(cfg(), 0) == torch.device("cpu")               # auto
    with pytest.raises(UserError, match="engine.device: cuda requested"):
        select_device(cfg(engine__device="cuda"), 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_device_selection_with_gpus():
    n = torch.cuda.device_count()
    assert select_device(cfg(), n - 1) == torch.device("cuda", n - 1)  # one GPU per local rank
    with pytest.raises(UserError, match="CUDA_VISIBLE_DEVICES"):
        select_device(cfg(), n)


def test_dtype_selection():
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert select_dtype(cfg(), gpu) == torch.float16                   # auto on CUDA
    assert select_dtype(cfg(workload__dtype="bfloat16"), cpu) == torch.bfloat16
    with pytest.raises(UserError, match="workload.dtype: float16 is refused"):
        select_dtype(cfg(workload__dtype="float16"), cpu)


@pytest.mark.parametrize("over,ranks,key", [
    (dict(engine__kernel_inject=True, strategy="tp", topology__tp=2), 2, "n_head % tp"),
    (dict(engine__cuda_graph=True, strategy="tp"), 2, "replays it for every later call"),
    (dict(engine__cuda_graph=True, engine__kernel_inject=True), 1, "rerun the prefill"),
    (dict(engine__kernel_inject=True, strategy="pp"), 2, "PipelineModule"),
    (dict(engine__backend="hf_eager", strategy="tp"), 2, "engine.backend"),
    (dict(engine__backend="hf_eager", engine__kernel_inject=True), 1, "engine.backend"),
    (dict(topology__pipe_topology="PipeDataParallelTopology", strategy="full"), 4, "model axis"),
    (dict(topology__world_size=2), 4, "topology.world_size=2"),
    (dict(workload__input_len=500, workload__output_len=20), 1, "512 positions"),
])
def test_option_matrix_refusals(over, ranks, key):
    with pytest.raises(UserError, match=re.escape(key)) as e:
        resolve(cfg(**over), ranks)
    assert not isinstance(e.value, NotApplicable)


def test_kernel_injection_is_gated_on_the_transformers_interface():
    import transformers

    from gptbench.runplan import KERNEL_INJECT_MAX_TRANSFORMERS

    c = cfg(engine__kernel_inject=True, engine__device="cuda")  # 5 heads at tp=1 divide
    version = tuple(int(x) for x in transformers.__version__.split(".")[:2])
    if version > KERNEL_INJECT_MAX_TRANSFORMERS:
        with pytest.raises(UserError, match="layer_past"):
            resolve(c, 1)
    elif torch.cuda.is_available():
        assert resolve(c, 1).cfg.engine.kernel_inject
    else:
        with pytest.raises(UserError, match="engine.device"):
            resolve(c, 1)


def test_full_model_parallel_on_two_ranks_is_not_applicable():
    with pytest.raises(NotApplicable, match="at least 4 ranks"):
        resolve(cfg(strategy="full"), 2)


def test_deepspeed_json_per_strategy_and_yaml_switches_on_top(tmp_path):
    from gptbench import dsconfig

    for strategy in ("pure_data_parallel", "tensor_data_hybrid", "pipeline_data_hybrid",
                     "full_model_parallel"):
        assert dsconfig.load(cfg(strategy=strategy)) == dsconfig.load(
            cfg(strategy=strategy, engine__deepspeed_config=dsconfig.path_for(cfg(strategy=strategy))))
    pipe = dsconfig.pipeline_config(cfg(strategy="pp"), micro_batches=2)
    assert pipe["pipeline"]["pipe_partitioned"] is False           # from the JSON
    assert pipe["train_micro_batch_size_per_gpu"] == 2             # batch 4 / 2 micro-batches
    assert pipe["gradient_accumulation_steps"] == 2
    inject = dsconfig.inference_config(cfg(engine__kernel_inject=True))
    assert inject["replace_with_kernel_inject"] is True            # the YAML wins


@pytest.mark.parametrize("content,message", [(None, "file not found"), ("{oops", "not valid JSON"),
                                             ("[1, 2]", "JSON object")])
def test_bad_deepspeed_json_is_bad_input(tmp_path, content, message):
    path = tmp_path / "ds.json"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(UserError, match=f"engine.deepspeed_config: .*{message}"):
        resolve(cfg(engine__deepspeed_config=str(path)), 1)


@pytest.mark.parametrize("over, ranks, run_id", [
    (dict(strategy="tp", topology__tp=3), 1, "1r-tp-tp3-pp1"),
    (dict(strategy="pp", topology__pp=4), 1, "1r-pp-tp1-pp4"),
    (dict(strategy="full"), 2, "2r-full-tp2-pp2"),
])
def test_a_grid_that_cannot_be_formed_is_named_by_its_own_degrees(over, ranks, run_id):
    """No pipeline degree in a tensor run's name, no tensor degree in a pipeline's."""
    from gptbench.runplan import run_id_for

    assert run_id_for(cfg(**over), ranks) == run_id


@pytest.mark.parametrize("over, ranks, samples, tokens", [
    (dict(strategy="pp", topology__pp=4, workload__output_len=8), 4, 4, 8),  # m=4: whole batch
    (dict(strategy="pp", topology__micro_batches=4), 2, 4, 4),             # tokens capped
    (dict(strategy="tp", parity__samples=2, parity__tokens=3), 2, 2, 3),
])
def test_parity_probe_is_a_whole_batch_by_default_and_tokens_are_capped(over, ranks, samples,
                                                                        tokens):
    plan = resolve(cfg(**over), ranks)
    assert (plan.cfg.parity.samples, plan.cfg.parity.tokens) == (samples, tokens)
    assert plan.cfg.parity.samples % plan.micro_batches == 0


def test_an_explicit_probe_must_split_into_the_micro_batches():
    with pytest.raises(UserError, match=r"parity.samples=2 does not split into "
                                        r"topology.micro_batches=4"):
        resolve(cfg(strategy="pp", topology__micro_batches=4, parity__samples=2), 2)


def test_too_few_gpus_are_refused_with_cuda_visible_devices_set_or_not(monkeypatch):
    from gptbench.runplan import check_gpu_count

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with pytest.raises(UserError, match=re.escape(
            "engine.device: cuda requested for 4 rank(s) on this machine, one GPU each, but "
            "torch sees 1 GPU(s) (CUDA_VISIBLE_DEVICES=unset)")):
        check_gpu_count(4, 1)
    check_gpu_count(2, 2)
    check_gpu_count(1, 4)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    with pytest.raises(UserError, match=re.escape("CUDA_VISIBLE_DEVICES='3'")):
        check_gpu_count(2, 1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_every_rank_of_a_gpu_run_is_counted_up_front():
    """Local rank 0 alone would find its GPU; the run as a whole is refused."""
    with pytest.raises(UserError, match=re.escape("cuda requested for 4 rank(s)")):
        resolve(cfg(engine__device="cuda", strategy="tp"), 4)


# ---- what the orchestrator decides without torch -------------------------------------------

def test_plan_device_and_dtype_are_torch_objects_decided_without_torch():
    plan = resolve(cfg(engine__device="cpu", workload__dtype="bfloat16"), 2)
    assert (plan.device_type, plan.device_index, plan.dtype_name) == ("cpu", None, "bfloat16")
    assert plan.device == torch.device("cpu") and plan.dtype == torch.bfloat16
    assert plan.compile_mode == "off"


@pytest.mark.parametrize("name,preset", [("tiny", "tiny"), ("small", "small"), ("gpt2", None),
                                         ("gpt2-medium", None), ("gpt2-xl", None)])
@pytest.mark.parametrize("tied", [True, False])
def test_model_dims_without_transformers_match_gpt2config(name, preset, tied):
    from gptbench import modelspec
    from gptbench.models import gpt2_config

    c = gpt2_config(name, preset, tied)
    assert modelspec.dims(name, preset, tied) == {
        "n_layer": c.n_layer, "n_head": c.n_head, "n_embd": c.n_embd, "vocab_size": c.vocab_size,
        "n_positions": c.n_positions, "tied_embeddings": bool(c.tie_word_embeddings)}


def test_model_dims_of_a_local_checkpoint_match_gpt2config(tmp_path):
    from gptbench import modelspec
    from gptbench.models import gpt2_config

    (tmp_path / "config.json").write_text('{"model_type": "gpt2", "n_layer": 3, "n_head": 4, '
                                          '"n_embd": 64, "tie_word_embeddings": false}')
    c = gpt2_config(str(tmp_path), None)
    assert modelspec.dims(str(tmp_path), None) == {
        "n_layer": 3, "n_head": 4, "n_embd": 64, "vocab_size": c.vocab_size,
        "n_positions": c.n_positions, "tied_embeddings": bool(c.tie_word_embeddings)}
    assert modelspec.dims("openai-community/gpt2-xl", None) is None  # only from_pretrained knows
