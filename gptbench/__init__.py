"""gptbench: honest measurements of GPT-2 generation spread over GPUs with DeepSpeed."""

__version__ = "0.1.0"
