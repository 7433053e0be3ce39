"""Per-rank entry: `deepspeed --num_gpus N launch/run.py --config FILE [--set key=value ...]`."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gptbench.worker import main  # noqa: E402

if __name__ == "__main__":
    code = main()
    # Everything is written (records atomically, process groups destroyed): skip the
    # interpreter's teardown of torch, DeepSpeed and transformers, which costs every rank
    # a second or more per run and would leave C++ threads to race at exit.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
