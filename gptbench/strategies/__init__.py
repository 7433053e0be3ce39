"""The strategy registry: a plain dict from the record's strategy name to its `build`."""
from gptbench.strategies import data, pipeline, tensor

REGISTRY = {
    "pure_data_parallel": data.build,
    "tensor_data_hybrid": tensor.build,
    "pipeline_data_hybrid": pipeline.build,
    "full_model_parallel": pipeline.build,
}
