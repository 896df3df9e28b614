"""visattn's shared attention op layer (importable as ``visattn.kernels``)."""
from .na import available_backends, na1d, na2d, na3d
from .reference import neighborhood_index
from .routed import region_topk, routed_attention, routed_attention_2d

__all__ = ["available_backends", "na1d", "na2d", "na3d", "neighborhood_index", "region_topk", "routed_attention",
           "routed_attention_2d"]
