"""visattn model families; importing this registers every ``visattn_*`` model with timm."""
from . import nat
from .nat import NAT, NATDenseBackbone, NATIsotropic

__all__ = ["NAT", "NATDenseBackbone", "NATIsotropic", "nat"]
