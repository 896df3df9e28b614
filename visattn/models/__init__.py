"""visattn model families; importing this registers every ``visattn_*`` model with timm."""
from . import a2n, biformer, han, hat, nat, pan, rcan, tcsr
from .a2n import A2N
from .biformer import BiFormer, BiFormerDenseBackbone
from .han import HAN
from .hat import HAT
from .nat import NAT, NATDenseBackbone, NATIsotropic
from .pan import PAN
from .rcan import RCAN
from .tcsr import TCSR

__all__ = ["A2N", "BiFormer", "BiFormerDenseBackbone", "HAN", "HAT", "NAT", "NATDenseBackbone", "NATIsotropic", "PAN",
           "RCAN", "TCSR", "a2n", "biformer", "han", "hat", "nat", "pan", "rcan", "tcsr"]
