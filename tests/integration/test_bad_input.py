"""Bad input is refused before anything starts: exit code 2, one line on stderr naming the
key, file or line at fault, no traceback, nothing written in the output folder.

Most cases call `gptbench.cli.main` in-process (the same code path as the command, without
paying the imports again); a few run the real command in a subprocess to prove the exit
code and the absence of a traceback end to end.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from gptbench import cli, launcher
from gptbench.errors import UserError
from paths import CONFIGS, FIXTURES, ROOT

FIXTURE_SUITE = os.path.join(FIXTURES, "suite")
GOOD_SAMPLES = "\n".join(json.dumps({"input_ids": list(range(i, i + 32))}) for i in range(8))

SUITE = """\
title: bad
base: tiny.yaml
runs:
  - {id: a, ranks: 1}
"""

# id: (files to write {name: text}, argv after `gptbench`, extra env, text stderr must hold)
CASES = {
    "unknown-strategy": ({}, ["run", "--config", "tiny.yaml", "--set", "strategy=zero"], {},
                         "strategy: 'zero'"),
    "unknown-top-key": ({"c.yaml": "colour: red\n"}, ["run", "--config", "c.yaml"], {},
                        "'colour'"),
    "unknown-nested-key": ({}, ["run", "--config", "tiny.yaml", "--set", "workload.batchsize=4"],
                           {}, "'workload.batchsize'"),
    "string-for-int": ({}, ["run", "--config", "tiny.yaml", "--set", "workload.batch_size=four"],
                       {}, "workload.batch_size: expected int"),
    "bool-for-int": ({}, ["run", "--config", "tiny.yaml", "--set", "workload.output_len=true"],
                     {}, "workload.output_len: expected int"),
    "zero-batch": ({}, ["run", "--config", "tiny.yaml", "--set", "workload.batch_size=0"], {},
                   "workload.batch_size: must be positive"),
    "negative-input-len": ({}, ["run", "--config", "tiny.yaml", "--set", "workload.input_len=-3"],
                           {}, "workload.input_len: must be positive"),
    "zero-ranks": ({}, ["run", "--config", "tiny.yaml", "--ranks", "0"], {}, "--ranks"),
    "tp-not-dividing-world": ({}, ["run", "--config", "tiny.yaml", "--ranks", "4", "--set",
                                   "strategy=tp", "--set", "topology.tp=3"], {},
                              "topology.tp=3 does not divide world_size=4"),
    "tp-over-heads": ({}, ["run", "--config", "tiny.yaml", "--ranks", "8", "--set", "strategy=tp",
                           "--set", "topology.tp=8"], {}, "topology.tp=8 exceeds the model's n_head=5"),
    "pp-over-blocks": ({}, ["run", "--config", "tiny.yaml", "--ranks", "8", "--set", "strategy=pp",
                            "--set", "topology.pp=8"], {}, "topology.pp=8 exceeds the model's 4 blocks"),
    "batch-vs-micro-batches": ({}, ["run", "--config", "tiny.yaml", "--ranks", "2", "--set",
                                    "strategy=pp", "--set", "topology.micro_batches=3"], {},
                               "topology.micro_batches=3"),
    "samples-vs-batch": ({}, ["run", "--config", "tiny.yaml", "--set", "workload.num_samples=6"],
                         {}, "workload.num_samples (6)"),
    "beyond-positions": ({}, ["run", "--config", "tiny.yaml", "--set", "workload.input_len=500",
                              "--set", "workload.output_len=20"], {},
                         "exceeds the model's 512 positions"),
    "kernel-inject-uneven-heads": ({}, ["run", "--config", "tiny.yaml", "--ranks", "2", "--set",
                                        "strategy=tp", "--set", "engine.kernel_inject=true"], {},
                                   "engine.kernel_inject"),
    "cuda-graph-with-tp": ({}, ["run", "--config", "tiny.yaml", "--ranks", "2", "--set",
                                "strategy=tp", "--set", "engine.cuda_graph=true"], {},
                           "engine.cuda_graph"),
    "fp16-on-cpu": ({}, ["run", "--config", "tiny.yaml", "--set", "workload.dtype=float16"], {},
                    "workload.dtype: float16"),
    "world-size-vs-ranks": ({}, ["run", "--config", "tiny.yaml", "--ranks", "2", "--set",
                                 "topology.world_size=4"], {}, "topology.world_size=4"),
    "bad-run-id": ({}, ["run", "--config", "tiny.yaml", "--set", "run_id=a/b"], {}, "run_id"),
    "set-without-value": ({}, ["run", "--config", "tiny.yaml", "--set", "workload.batch_size"],
                          {}, "--set expects key=value"),
    "missing-config": ({}, ["run", "--config", "nope.yaml"], {}, "nope.yaml"),
    "malformed-yaml": ({"bad.yaml": "strategy: dp\nworkload:\n  batch_size: [4\n  input_len: 3\n"},
                       ["run", "--config", "bad.yaml"], {}, "bad.yaml:4: not valid YAML"),
    "missing-dataset": ({}, ["run", "--config", "tiny.yaml", "--set", "workload.dataset=gone.jsonl"],
                        {}, "workload.dataset: file not found: gone.jsonl"),
    "malformed-dataset-line": ({"x.jsonl": '{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "c"\n'},
                               ["run", "--config", "tiny.yaml", "--set", "workload.dataset=x.jsonl"],
                               {}, "x.jsonl:3"),
    "token-id-outside-vocab": ({"ids.jsonl": json.dumps({"input_ids": [1] * 32}) + "\n"
                                + json.dumps({"input_ids": [1] * 31 + [512]}) + "\n"},
                               ["run", "--config", "tiny.yaml", "--set", "workload.dataset=ids.jsonl"],
                               {}, "ids.jsonl:2: token id 512"),
    "too-few-samples": ({"few.jsonl": GOOD_SAMPLES.splitlines()[0] + "\n"},
                        ["run", "--config", "tiny.yaml", "--set", "workload.dataset=few.jsonl"],
                        {}, "few.jsonl holds 1 samples"),
    "prompts-without-tokenizer": ({"p.jsonl": '{"prompt": "hello"}\n'},
                                  ["run", "--config", "tiny.yaml", "--set", "workload.dataset=p.jsonl"],
                                  {}, "tokenizer of model.name 'tiny'"),
    "suite-missing-base": ({"s.yaml": SUITE.replace("tiny.yaml", "absent.yaml")},
                           ["suite", "s.yaml"], {}, "base config not found"),
    "suite-unknown-key": ({"s.yaml": SUITE + "colour: red\n"}, ["suite", "s.yaml"], {},
                          "unknown suite key 'colour'"),
    "suite-unknown-run-key": ({"s.yaml": SUITE + "  - {id: b, rank: 2}\n"}, ["suite", "s.yaml"],
                              {}, "runs[1]: unknown key 'rank'"),
    "suite-duplicate-ids": ({"s.yaml": SUITE + "  - {id: a, ranks: 2}\n"}, ["suite", "s.yaml"],
                            {}, "duplicate id 'a'"),
    "suite-bad-override": ({"s.yaml": SUITE + "  - {id: b, ranks: 2, set: {workload.bogus: 1}}\n"},
                           ["suite", "s.yaml"], {}, "run 'b': unknown config key 'workload.bogus'"),
    "suite-only-unknown": ({"s.yaml": SUITE}, ["suite", "s.yaml", "--only", "zz"], {},
                           "--only: no run 'zz'"),
    "compare-unknown-metric": ({}, ["compare", FIXTURE_SUITE, FIXTURE_SUITE, "--fail-on",
                                    "speed_of_light:5"], {}, "speed_of_light"),
    "not-applicable-run": ({}, ["run", "--config", "tiny.yaml", "--set",
                                "strategy=tensor_data_hybrid", "--set", "topology.tp=3"], {},
                           "1r-tp-tp3-pp1: not applicable: tp=3 needs at least 3 ranks; "
                           "this run has 1"),
    "output-dir-in-proc": ({}, ["run", "--config", "tiny.yaml", "--set", "output_dir=/proc/x"],
                           {}, "output_dir: cannot create /proc/x"),
    "output-dir-under-a-file": ({"f.txt": "x"}, ["run", "--config", "tiny.yaml", "--set",
                                                 "output_dir=f.txt/out"], {},
                                "output_dir: cannot create f.txt/out"),
    "model-folder-missing": ({}, ["run", "--config", "tiny.yaml", "--set", "model.name=/no/such/dir",
                                  "--set", "model.preset=null"], {},
                             "model.name: the folder /no/such/dir does not exist"),
    "pretrained-not-in-offline-cache": ({}, ["run", "--config", "tiny.yaml", "--set",
                                             "model.name=gpt2-xl", "--set", "model.preset=null",
                                             "--set", "model.weights=pretrained"],
                                        {"HF_HOME": "empty-hf-home"},
                                        "gpt2-xl is not in the Hugging Face cache and "
                                        "HF_HUB_OFFLINE=1 forbids downloading it"),
    "fault-bad-kind": ({}, ["run", "--config", "tiny.yaml"],
                       {"GPTBENCH_FAULT": "rank=0,at=decode,kind=explode"}, "kind='explode'"),
    "fault-not-key-value": ({}, ["run", "--config", "tiny.yaml"], {"GPTBENCH_FAULT": "crash"},
                            "GPTBENCH_FAULT='crash'"),
    "fault-missing-field": ({}, ["run", "--config", "tiny.yaml"],
                            {"GPTBENCH_FAULT": "rank=1,at=load"}, "missing 'kind'"),
    "fault-rank-out-of-range": ({}, ["run", "--config", "tiny.yaml", "--ranks", "2"],
                                {"GPTBENCH_FAULT": "rank=5,at=load,kind=crash"}, "rank=5"),
    "suite-fault-rank-out-of-range": ({"s.yaml": SUITE}, ["suite", "s.yaml"],
                                      {"GPTBENCH_FAULT": "rank=1,at=load,kind=crash"}, "rank=1"),
}
# Issue 24 (hostile input): one example of each class it found, each refused in one line.
BINARY = b"\x80\x81\xfe\x00 strategy: dp\n"
SET = ["run", "--config", "tiny.yaml", "--set"]
CASES.update({
    "binary-config": ({"bin.yaml": BINARY}, ["run", "--config", "bin.yaml"], {},
                      "bin.yaml is not UTF-8 text (byte 0: 0x80)"),
    "binary-dataset": ({"bin.jsonl": BINARY}, SET + ["workload.dataset=bin.jsonl"], {},
                       "bin.jsonl is not UTF-8 text (byte 0"),
    "binary-prompts": ({"bin.jsonl": BINARY}, ["datasets", "make", "--out", "o.jsonl",
                                              "--prompts", "bin.jsonl"], {},
                       "bin.jsonl is not UTF-8 text"),
    "binary-hostfile": ({"hosts": b"localhost slots=1\n\xff\n"},
                        ["run", "--config", "tiny.yaml", "--hostfile", "hosts"], {},
                        "hosts is not UTF-8 text (byte 18: 0xff)"),
    "binary-suite": ({"s.yaml": BINARY}, ["suite", "s.yaml"], {}, "s.yaml is not UTF-8 text"),
    "int-key": ({"k.yaml": "{1: 2}\n"}, ["run", "--config", "k.yaml"], {},
                "k.yaml:1: not valid YAML (key 1 (int) is not a name"),
    "nested-int-key": ({"k.yaml": "workload:\n  7: 2\n"}, ["run", "--config", "k.yaml"], {},
                       "k.yaml:2: not valid YAML (key 7 (int) is not a name"),
    "list-as-key": ({"k.yaml": "? [a, b]\n: 1\n"}, ["run", "--config", "k.yaml"], {},
                    "a sequence is used as a key"),
    "nested-thousands-deep": ({"d.yaml": "a: " + "[" * 5000 + "]" * 5000 + "\n"},
                              ["run", "--config", "d.yaml"], {}, "nested more than 32 levels"),
    "nested-deep-mapping": ({"d.yaml": "".join("  " * i + f"k{i}:\n" for i in range(40))},
                            ["run", "--config", "d.yaml"], {}, "nested more than 32 levels"),
    "billion-laughs": ({"l.yaml": "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(9))
        + "strategy: *j\n"}, ["run", "--config", "l.yaml"], {}, "more than 100,000 values"),
    "recursive-alias": ({}, SET + ["strategy=&a [*a]"], {}, "an alias refers to itself"),
    "set-unclosed-list": ({}, SET + ["strategy=[unclosed"], {},
                          "--set strategy=[unclosed: not valid YAML"),
    "set-reserved-character": ({}, SET + ["model.name=@x"], {},
                               "--set model.name=@x: not valid YAML"),
    "set-int-key": ({}, SET + ["workload={1: 2}"], {}, "--set workload={1: 2}: not valid YAML"),
    "set-4301-digits": ({}, SET + ["model.seed=" + "7" * 4400], {}, "--set model.seed="),
    "nan-timeout": ({}, SET + ["timeout_s=.nan"], {}, "timeout_s: must be a finite number, got nan"),
    "inf-comm-timeout": ({}, SET + ["engine.comm_timeout_s=.inf"], {},
                         "engine.comm_timeout_s: must be a finite number, got inf"),
    "huge-comm-timeout": ({}, SET + ["engine.comm_timeout_s=1.0e+300"], {},
                          "engine.comm_timeout_s: 1e+300 is outside"),
    "nan-min-duration": ({}, SET + ["workload.min_duration_s=.nan"], {},
                         "workload.min_duration_s: must be a finite number"),
    "inf-max-cv": ({}, SET + ["workload.max_cv_pct=.inf"], {}, "workload.max_cv_pct: must be a finite"),
    "nan-tolerance": ({}, SET + ["parity.tolerance=.nan"], {}, "parity.tolerance: must be a finite"),
    "seed-beyond-64-bits": ({}, SET + ["model.seed=100000000000000000000000"], {},
                            "model.seed: 100000000000000000000000 is outside 0..18,446,744,073,709,551,615"),
    "negative-seed": ({}, SET + ["model.seed=-1"], {}, "model.seed: -1 is outside"),
    "threads-beyond-cores": ({}, SET + ["engine.threads=100000000000000000000000"], {},
                             "engine.threads: 100000000000000000000000 is outside 1.."),
    "batch-10-to-the-23": ({}, SET + ["workload.batch_size=100000000000000000000000"], {},
                           "workload.batch_size: 100000000000000000000000 is outside 1..65,536"),
    "samples-beyond-memory": ({}, SET + ["workload.num_samples=1000000", "--set",
                                         "workload.input_len=400"], {},
                              "workload.num_samples x workload.input_len = 400,000,000 tokens"),
    "ranks-20-digits": ({}, ["run", "--config", "tiny.yaml", "--ranks", "99999999999999999999"],
                        {}, "--ranks: 99999999999999999999 is outside 1.."),
    "ranks-beyond-the-machine": ({}, ["run", "--config", "tiny.yaml", "--ranks", "100000"], {},
                                 "ranks per core on this machine's"),
    "world-size-beyond-the-machine": ({}, SET + ["topology.world_size=100000"], {},
                                      "topology.world_size: 100000 is outside"),
    "hostfile-slots-beyond": ({"hosts": "localhost slots=99999999999999999999999\n"},
                              ["run", "--config", "tiny.yaml", "--hostfile", "hosts"], {},
                              "hosts:1: localhost has slots=9999"),
    "hostfile-unicode-digit": ({"hosts": "localhost slots=\u0663\n"},
                               ["run", "--config", "tiny.yaml", "--hostfile", "hosts"], {},
                               "hosts:1: expected 'HOST slots=N'"),
    "plan-inf-memory": ({}, ["plan", "--gpu-memory-gib", "inf", "--gpu-bandwidth-gbps", "900"],
                        {}, "--gpu-memory-gib: must be a finite number, got inf"),
    "plan-nan-latency": ({}, ["plan", "--comm-latency-us", "nan"], {},
                         "--comm-latency-us: must be a finite number, got nan"),
    "plan-gpus-beyond": ({}, ["plan", "--gpus", "99999999999999999999"], {}, "--gpus: 99999999999999999999"),
    "run-id-300-characters": ({}, SET + ["run_id=" + "r" * 300], {},
                              "run_id: 300 characters long, at most 200"),
    "run-id-hidden": ({}, SET + ["run_id=.x"], {}, "may not start with '.'"),
    "run-id-not-ascii": ({}, SET + ["run_id=r\u00e9sum\u00e9"], {}, "only ASCII letters"),
    "output-dir-name-too-long": ({}, SET + ["output_dir=" + "d" * 300], {},
                                 "output_dir: the name ddd"),
    "output-dir-runs-is-a-file": ({"o/runs": "not a folder"}, SET + ["output_dir=o"], {},
                                  "output_dir: cannot create o: "),
    "output-dir-ranks-is-a-file": ({"o/runs/.ranks": "x"}, SET + ["output_dir=o"], {},
                                   "o/runs/.ranks is not a folder"),
    "datasets-out-in-proc": ({}, ["datasets", "make", "--out", "/proc/x.jsonl"], {},
                             "--out /proc/x.jsonl: cannot create a file there"),
    "datasets-seed-beyond": ({}, ["datasets", "make", "--out", "o.jsonl", "--seed", str(2 ** 70)],
                             {}, "--seed: 1180591620717411303424 is outside"),
    "datasets-samples-beyond": ({}, ["datasets", "make", "--out", "o.jsonl", "--num-samples",
                                     "100000000000000000000"], {}, "--num-samples: 100000000000000000000"),
    "dataset-4301-digit-id": ({"d.jsonl": '{"input_ids": [' + "1" * 4400 + "]}\n"},
                              SET + ["workload.dataset=d.jsonl"], {}, "d.jsonl:1: not valid JSON"),
    "diagnose-comm-ranks-beyond": ({}, ["diagnose", "--comm", "--comm-ranks", "2,100000"], {},
                                   "--comm-ranks: 100000 is outside"),
    "diagnose-comm-ranks-superscript": ({}, ["diagnose", "--comm", "--comm-ranks", "\u00b2"], {},
                                        "--comm-ranks: expected world sizes"),
    "diagnose-comm-out-in-proc": ({}, ["diagnose", "--comm", "--out", "/proc/x/comm.json"], {},
                                  "--out /proc/x/comm.json: cannot create it"),
    "suite-empty-id": ({"s.yaml": SUITE + "  - {id: '', ranks: 1}\n"}, ["suite", "s.yaml"], {},
                       "runs[1]: id: must be a non-empty name"),
    "suite-null-id": ({"s.yaml": SUITE + "  - {id: null, ranks: 1}\n"}, ["suite", "s.yaml"], {},
                      "runs[1]: id: must be a non-empty name"),
    "suite-ranks-beyond": ({"s.yaml": SUITE + "  - {id: b, ranks: 100000}\n"}, ["suite", "s.yaml"],
                           {}, "runs[1]: ranks: 100000 is outside"),
    "suite-only-empty": ({"s.yaml": SUITE}, ["suite", "s.yaml", "--only", ""], {},
                         "--only: no run id given"),
    "fault-superscript-rank": ({}, ["run", "--config", "tiny.yaml"],
                               {"GPTBENCH_FAULT": "rank=\u00b2,at=load,kind=crash"},
                               "rank='\u00b2' is not a rank number"),
    "fault-arabic-digit-rank": ({}, ["run", "--config", "tiny.yaml"],
                                {"GPTBENCH_FAULT": "rank=\u0663,at=load,kind=crash"},
                                "is not a rank number"),
    "compare-fail-on-not-a-metric": ({}, ["compare", FIXTURE_SUITE, FIXTURE_SUITE, "--fail-on",
                                          "latency_s:5"], {}, "--fail-on latency_s: no run of"),
})
# The end-to-end subset: the real command in its own process.
SUBPROCESS = ("unknown-strategy", "not-applicable-run", "output-dir-in-proc",
              "pretrained-not-in-offline-cache", "malformed-yaml", "malformed-dataset-line", "fault-bad-kind",
              "suite-duplicate-ids", "tp-over-heads", "binary-config", "nested-thousands-deep",
              "compare-fail-on-not-a-metric")


def _workdir(tmp_path, files: dict):
    """A folder holding tiny.yaml (output_dir: out), good samples and the case's files."""
    text = open(os.path.join(CONFIGS, "tiny-cpu.yaml"), encoding="utf-8").read()
    text = text.replace("output_dir: reports/tiny-cpu", "output_dir: out")
    assert "output_dir: out" in text
    (tmp_path / "tiny.yaml").write_text(text, encoding="utf-8")
    (tmp_path / "good.jsonl").write_text(GOOD_SAMPLES + "\n", encoding="utf-8")
    for name, body in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        if isinstance(body, bytes):
            (tmp_path / name).write_bytes(body)
        else:
            (tmp_path / name).write_text(body, encoding="utf-8")
    return tmp_path


def _check(case: str, code: int, err: str, tmp_path) -> None:
    needle = CASES[case][3]
    assert code == 2, err
    assert needle in err, f"{needle!r} not in {err!r}"
    assert "Traceback" not in err
    assert err.startswith("gptbench: error: ") and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists(), "something was written for bad input"


@pytest.mark.parametrize("case", sorted(set(CASES) - set(SUBPROCESS)))
def test_refused_in_process(case, tmp_path, monkeypatch, capsys):
    files, argv, env, _ = CASES[case]
    _workdir(tmp_path, files)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GPTBENCH_FAULT", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    before = _files(tmp_path)
    code = cli.main(argv)
    out, err = capsys.readouterr()
    _check(case, code, err, tmp_path)
    assert out == "", "printed before refusing"
    assert _files(tmp_path) == before, "a file was written, changed or removed"


def _files(folder) -> dict:
    """Every file under `folder` and its bytes: bad input changes none of them."""
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", SUBPROCESS)
def test_refused_by_the_command(case, tmp_path):
    files, argv, env, _ = CASES[case]
    _workdir(tmp_path, files)
    full_env = {k: v for k, v in os.environ.items() if k != "GPTBENCH_FAULT"}
    full_env.update(env, HF_HUB_OFFLINE="1", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-m", "gptbench.cli", *argv], cwd=tmp_path,
                          env=full_env, capture_output=True, text=True, timeout=120)
    _check(case, proc.returncode, proc.stderr, tmp_path)
    assert proc.stdout == ""


def test_the_good_workdir_is_accepted(tmp_path, monkeypatch):
    """The cases above fail for their own fault: the same folder, fixed, passes validation."""
    _workdir(tmp_path, {})
    monkeypatch.chdir(tmp_path)
    for sets, ranks in ((["workload.dataset=good.jsonl"], 1), (["strategy=tp"], 4),
                        (["strategy=pp", "topology.micro_batches=2"], 2)):
        p = launcher.prepare("tiny.yaml", sets, ranks, fault_spec="rank=0,at=decode,kind=hang")
        assert p.not_applicable is None and p.device_type == "cpu"
    assert not (tmp_path / "out").exists()


def test_a_suite_is_checked_whole_before_it_starts(tmp_path, monkeypatch, capsys):
    """The bad run is the last one: nothing of the good first one may have started."""
    _workdir(tmp_path, {"s.yaml": SUITE + "  - {id: b, ranks: 2, set: {strategy: tp, topology.tp: 3}}\n"})
    monkeypatch.chdir(tmp_path)
    assert cli.main(["suite", "s.yaml", "--output-dir", "out"]) == 2
    err = capsys.readouterr().err
    assert "run 'b'" in err and "topology.tp=3" in err, err
    assert not (tmp_path / "out").exists()


def test_cuda_visible_devices_are_honoured():
    """The `deepspeed --num_gpus` command drops CUDA_VISIBLE_DEVICES and takes GPUs 0..N-1;
    gptbench hands the launcher the GPUs the user made visible."""
    assert launcher.device_ids(2, None) == [0, 1]
    assert launcher.device_ids(2, "") == [0, 1]
    assert launcher.device_ids(2, "2,3,5") == [2, 3]
    assert launcher.device_ids(1, "GPU-8f3c,GPU-11aa") == ["GPU-8f3c"]
    with pytest.raises(UserError, match="shows 1 GPU"):
        launcher.device_ids(2, "3")


def test_malformed_yaml_names_its_line(tmp_path, monkeypatch, capsys):
    body = textwrap.dedent("""\
        strategy: dp
        model:
          name: tiny
          weights: random
        workload: {batch_size: 4
        """)
    _workdir(tmp_path, {"m.yaml": body})
    monkeypatch.chdir(tmp_path)
    assert cli.main(["run", "--config", "m.yaml"]) == 2
    err = capsys.readouterr().err
    assert "m.yaml:6" in err or "m.yaml:5" in err, err


@pytest.mark.parametrize("row", ["{id: '', ranks: 1}", "{id: null}", "{id: a, ranks: 100000}",
                                 "{id: b, set: {timeout_s: .nan}}"])
def test_a_hostile_suite_row_moves_no_earlier_result_aside(row, tmp_path, monkeypatch, capsys):
    """Issue 24: a row with an empty id ran as "None" and moved the earlier results aside."""
    _workdir(tmp_path, {"s.yaml": SUITE.replace("title: bad", "title: bad\noutput_dir: res")
                        + f"  - {row}\n",
                        "res/runs/a.json": json.dumps({"earlier": True})})
    monkeypatch.chdir(tmp_path)
    before = _files(tmp_path)
    assert cli.main(["suite", "s.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gptbench: error: s.yaml") and len(err.splitlines()) == 1, err
    assert _files(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("res")) == ["res"]
