"""Per-rank entry: `deepspeed --num_gpus N launch/run.py --config FILE [--set key=value ...]`."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gptbench.worker import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
