"""`python -m gptbench ...` is the `gptbench` command."""
import sys

from gptbench.cli import main

sys.exit(main())
