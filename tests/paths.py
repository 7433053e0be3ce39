"""Test helper: the checkout's paths, for module-level constants of any tier (conftest.py
gives the same as fixtures)."""
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "deepspeed_configs")
TINY_CPU = os.path.join(CONFIGS, "tiny-cpu.yaml")  # the 4-layer random GPT-2 on CPU
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
