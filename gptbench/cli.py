"""`gptbench` command line. Bad input is one line on stderr and exit code 2, no traceback."""
from __future__ import annotations

import argparse
import os
import sys

from gptbench.errors import UserError


def _run(a) -> int:
    from gptbench import launcher

    record = launcher.run(a.config, a.set, ranks=a.ranks, hostfile=a.hostfile,
                          refuse_not_applicable=True)
    m = record.get("metrics") or {}
    status = record["status"]
    if status == "ok":
        print(f"{record['run_id']}: {m['throughput_tokens_per_s']:.1f} tokens/s, "
              f"parity {'passed' if (record.get('parity') or {}).get('passed') else 'not passed'}")
    else:
        print(f"{record['run_id']}: {status}: {record.get('error')}")
    return 0 if status in ("ok", "not_applicable") else 1


def _emulate(a) -> int:
    from gptbench import emulate

    return emulate.emulate_command(a.config, a.set, a.ranks, a.comm_file, a.interconnect)


def _suite(a) -> int:
    from gptbench import suite

    if a.emulate:
        return suite.emulate_suite(a.file, output_dir=a.output_dir, only=a.only,
                                   overrides=a.set, comm_file=a.comm_file,
                                   interconnect=a.interconnect)
    if a.comm_file or a.interconnect:
        raise UserError("--comm-file/--interconnect apply to --emulate only")
    return suite.run_suite(a.file, resume=a.resume, output_dir=a.output_dir, only=a.only,
                           overrides=a.set)


def _report(a) -> int:
    from gptbench.report.render import render_report

    written, skipped = render_report(a.dir, title=a.title)
    for name, path in sorted(written.items()):
        print(f"{name}: {path}")
    for path, reason in skipped:
        print(f"gptbench: skipped {path}: {reason}", file=sys.stderr)
    return 0


def _compare(a) -> int:
    from gptbench.compare import compare, parse_fail_on

    gates = [gate for spec in a.fail_on for gate in parse_fail_on(spec)]
    text, code = compare(a.base, a.candidate, gates, allow_missing=a.allow_missing,
                         noise=a.noise)
    print(text, end="")
    return code


def _plan(a) -> int:
    from gptbench import plan

    return plan.main(a)


def _datasets_make(a) -> int:
    from gptbench import datasets, limits

    limits.check_seed("--seed", a.seed)
    limits.check_int("--vocab-size", a.vocab_size, 1, 2 ** 31 - 1)

    datasets.check_make_inputs(a.out, a.num_samples, a.input_len, a.n_positions, a.prompts,
                               a.tokenizer)
    if a.prompts:
        prompts = datasets.load_prompts(a.prompts)  # names file:line before the tokenizer loads
        tok = datasets.load_tokenizer(a.tokenizer)
        ids = datasets.make_samples(a.num_samples, a.input_len, len(tok), a.seed,
                                    prompts=prompts, tokenizer=tok)
    else:
        ids = datasets.make_samples(a.num_samples, a.input_len, a.vocab_size, a.seed)
    datasets.save_samples(a.out, ids)
    print(f"{a.out}: {ids.shape[0]} samples x {ids.shape[1]} tokens")
    return 0


def _diagnose(a) -> int:
    from gptbench import diagnose

    return diagnose.main(a)


def _bench_cpu(a) -> int:
    from gptbench import benchcpu

    return benchcpu.main(a.output_dir)


def _bench_emulate_cpu(a) -> int:
    from gptbench import benchemulate

    return benchemulate.main(a.output_dir, a.real_dir)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gptbench", description=(
        "Benchmark GPT-2 generation under data, tensor, pipeline and hybrid parallelism "
        "on DeepSpeed."))
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="one configuration through the deepspeed launcher")
    r.add_argument("--config", required=True)
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    r.add_argument("--ranks", type=int, help="ranks to start (default topology.world_size or 1)")
    r.add_argument("--hostfile", help="DeepSpeed hostfile ('HOST slots=N' lines): one rank per "
                   "slot on those hosts, started over ssh by DeepSpeed's multi-node launcher")
    r.set_defaults(fn=_run)

    s = sub.add_parser("suite", help="every configuration of a suite YAML, then the report")
    s.add_argument("file")
    s.add_argument("--resume", action="store_true", help="skip configurations already recorded")
    s.add_argument("--output-dir", help="override the suite's output_dir")
    s.add_argument("--only", action="append", metavar="ID[,ID]",
                   help="run only these run ids (repeat the flag or separate them by commas)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override applied to every configuration")
    s.add_argument("--emulate", action="store_true", help="emulate every row on this one "
                   "device instead of running it (gptbench emulate; records emu-<id>)")
    from gptbench.emulate import add_latency_arguments
    add_latency_arguments(s)
    s.set_defaults(fn=_suite)

    em = sub.add_parser("emulate", help="a multi-rank configuration measured on one device: "
                        "each rank role under a fake process group, then predicted")
    em.add_argument("--config", required=True)
    em.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    em.add_argument("--ranks", type=int, help="ranks of the run emulated (default "
                    "topology.world_size or 1)")
    add_latency_arguments(em)
    em.set_defaults(fn=_emulate)

    rp = sub.add_parser("report", help="render report.html/report.md/summary.csv from records")
    rp.add_argument("dir")
    rp.add_argument("--title")
    rp.set_defaults(fn=_report)

    c = sub.add_parser("compare", help="per-configuration deltas between two result folders")
    c.add_argument("base")
    c.add_argument("candidate")
    c.add_argument("--fail-on", action="append", default=[], metavar="METRIC:PCT[,METRIC:PCT]",
                   help="exit 1 when a metric, named as printed (ttft_ms.p99), gets worse by "
                        "more than PCT percent in a matched run; exit 2 when it compared nothing")
    c.add_argument("--allow-missing", action="store_true",
                   help="a base run with no match in the candidate does not fail --fail-on")
    c.add_argument("--noise", choices=("intervals", "mann-whitney", "none"), default="intervals",
                   help="what tells a change beyond its limit from noise: the runs' 95 %% "
                        "intervals not overlapping (default), a Mann-Whitney test on their "
                        "per-batch figures, or nothing")
    c.set_defaults(fn=_compare)

    pl = sub.add_parser("plan", help="predicted memory and roofline bounds per strategy")
    from gptbench.plan import add_arguments as add_plan_arguments
    add_plan_arguments(pl)
    pl.set_defaults(fn=_plan)

    d = sub.add_parser("datasets", help="benchmark datasets")
    dsub = d.add_subparsers(dest="datasets_command", required=True)
    dm = dsub.add_parser("make", help="N samples of exactly L input tokens, as JSONL")
    dm.add_argument("--out", required=True)
    dm.add_argument("--num-samples", type=int, default=80)
    dm.add_argument("--input-len", type=int, default=256)
    dm.add_argument("--seed", type=int, default=0)
    dm.add_argument("--vocab-size", type=int, default=50257, help="for synthetic ids")
    dm.add_argument("--prompts", help="tile these JSONL prompts instead of synthetic ids")
    dm.add_argument("--n-positions", type=int, default=1024,
                    help="the model's positions; --input-len may not exceed them (GPT-2: 1024)")
    dm.add_argument("--tokenizer", default="gpt2",
                    help="a local tokenizer folder, or a name found in the Hugging Face cache "
                         "(downloaded only with HF_HUB_OFFLINE=0)")
    dm.set_defaults(fn=_datasets_make)

    dg = sub.add_parser("diagnose", help="GPUs, drivers, CUDA/NCCL, topology, DeepSpeed ops")
    dg.add_argument("--hostfile", help="also check every host of this DeepSpeed hostfile: ssh, "
                    "the repo at the same path, the same gptbench/torch/DeepSpeed versions")
    from gptbench.diagnose_comm import add_arguments as add_diagnose_arguments
    add_diagnose_arguments(dg)
    dg.set_defaults(fn=_diagnose)

    b = sub.add_parser("bench-cpu", help="harness overhead and 2-rank scaling on CPU")
    b.add_argument("--output-dir", default="reports/bench-cpu")
    b.set_defaults(fn=_bench_cpu)

    be = sub.add_parser("bench-emulate-cpu", help="the demo's real runs beside their emulated "
                        "predictions (measured_over_emulated per row)")
    be.add_argument("--output-dir", default="reports/bench-emulate-cpu")
    be.add_argument("--real-dir", help="take the real runs from this suite folder instead of "
                    "running the demo suite again")
    be.set_defaults(fn=_bench_emulate_cpu)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except UserError as e:  # one line whatever the message quotes (a user's newline)
        message = str(e).replace("\r", "\\r").replace("\n", "\\n")
        print(f"gptbench: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gptbench: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
