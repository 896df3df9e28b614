"""visattn's shared attention op layer (importable as ``visattn.kernels``)."""
from .depthwise_conv import depthwise_conv2d_nhwc
from .na import available_backends, na1d, na1d_qkv, na2d, na2d_qkv, na3d, na3d_qkv
from .reference import neighborhood_index
from .routed import region_topk, region_topk_2d, routed_attention, routed_attention_2d

__all__ = ["available_backends", "depthwise_conv2d_nhwc", "na1d", "na1d_qkv", "na2d", "na2d_qkv", "na3d", "na3d_qkv",
           "neighborhood_index", "region_topk", "region_topk_2d", "routed_attention", "routed_attention_2d"]
