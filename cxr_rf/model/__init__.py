"""The MMDiT generator: config, module, init helpers and analytic size/cost."""
from cxr_rf.model.mmdit import (
    MMDiT,
    MMDiTBlock,
    ModelConfig,
    abstract_params,
    approx_param_count,
    build_model,
    flops_per_image,
    init_params,
    param_count,
)

__all__ = [
    "MMDiT", "MMDiTBlock", "ModelConfig", "abstract_params", "approx_param_count",
    "build_model", "flops_per_image", "init_params", "param_count",
]
