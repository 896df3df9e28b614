"""Transformer blocks shared by the attention families."""

from typing import Optional, Type

import torch
import torch.nn as nn
from timm.layers import DropPath, LayerScale, Mlp

from visattn.layers.norm import LayerNorm


class NHWCTransformerBlock(nn.Module):
    """Pre-norm transformer block on channels-last maps ``[B, H, W, C]``:

    ``x = x + drop_path(ls1(attn(norm1(x))))``; ``x = x + drop_path(ls2(mlp(norm2(x))))``.

    ``attn`` is any module mapping ``[B, H, W, C]`` to itself; ``mlp_layer`` builds the MLP as
    ``mlp_layer(dim, hidden, act_layer=..., drop=...)`` (timm's ``Mlp`` by default). ``layer_scale``
    (an init value) enables the per-channel ``ls1.gamma`` / ``ls2.gamma`` scales.
    ``autocast_norm_output`` lets the norms (when they are :class:`~visattn.layers.LayerNorm`) return
    the autocast dtype under autocast: for ``attn`` / ``mlp`` whose every use of their input goes
    through ops autocast casts to that dtype anyway (a Linear or Conv, after exact pads / reshapes),
    which then see the same values, without an fp32 copy of the normed map and its cast.
    """

    def __init__(
        self,
        dim: int,
        attn: nn.Module,
        mlp_ratio: float = 4.0,
        layer_scale: Optional[float] = None,
        drop_path: float = 0.0,
        proj_drop: float = 0.0,
        act_layer: Type[nn.Module] = nn.GELU,
        norm_layer: Type[nn.Module] = LayerNorm,
        mlp_layer: Type[nn.Module] = Mlp,
        autocast_norm_output: bool = False,
    ):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = attn
        self.ls1 = LayerScale(dim, layer_scale) if layer_scale else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = mlp_layer(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.ls2 = LayerScale(dim, layer_scale) if layer_scale else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        for norm in (self.norm1, self.norm2):
            if isinstance(norm, LayerNorm):
                norm.autocast_output = autocast_norm_output

    def residual_branches(self, x: torch.Tensor) -> torch.Tensor:
        """The two pre-norm residual updates (subclasses wrap them; TorchScript has no ``super()``)."""
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.residual_branches(x)
