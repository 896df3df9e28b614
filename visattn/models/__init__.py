"""visattn model families; importing this registers every ``visattn_*`` model with timm."""
from . import biformer, nat
from .biformer import BiFormer, BiFormerDenseBackbone
from .nat import NAT, NATDenseBackbone, NATIsotropic

__all__ = ["BiFormer", "BiFormerDenseBackbone", "NAT", "NATDenseBackbone", "NATIsotropic", "biformer", "nat"]
