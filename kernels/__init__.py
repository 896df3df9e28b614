"""visattn's shared attention op layer (importable as ``visattn.kernels``)."""
from .na import available_backends, na1d, na2d, na3d
from .reference import neighborhood_index

__all__ = ["available_backends", "na1d", "na2d", "na3d", "neighborhood_index"]
