"""Parameter-free spatial shift and the shift-enhanced MLP built on it (TCSR's EFFN)."""
from typing import Optional, Type

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import register_notrace_function

__all__ = ["ShiftMlp", "spatial_shift"]


@register_notrace_function  # shape checks and slicing by the channel count: one call in torch.fx graphs
def spatial_shift(x: torch.Tensor, shift: int = 1) -> torch.Tensor:
    """Shift four equal channel groups of ``[B, H, W, C]`` by ``shift`` pixels, zero-filled.

    Channel group 0 moves right (``out[:, :, w] = x[:, :, w - shift]``), group 1 left, group 2
    down, group 3 up; the last ``C % 4`` channels stay in place. A 1x1 layer after it mixes each
    pixel with its four neighbours at no parameter cost (the shift of S2-MLP / SCNet).
    """
    if x.dim() != 4:
        raise ValueError(f"spatial_shift expects [B, H, W, C], got shape {list(x.shape)}")
    g = x.shape[-1] // 4
    if g == 0:
        raise ValueError(f"spatial_shift needs at least 4 channels, got {x.shape[-1]}")
    right, left, down, up, rest = x[..., :g], x[..., g:2 * g], x[..., 2 * g:3 * g], x[..., 3 * g:4 * g], x[..., 4 * g:]
    # F.pad on [B, H, W, C] pads (C_lo, C_hi, W_lo, W_hi, H_lo, H_hi).
    right = F.pad(right, (0, 0, shift, 0))[:, :, : x.shape[2]]
    left = F.pad(left, (0, 0, 0, shift))[:, :, shift:]
    down = F.pad(down, (0, 0, 0, 0, shift, 0))[:, : x.shape[1]]
    up = F.pad(up, (0, 0, 0, 0, 0, shift))[:, shift:]
    return torch.cat([right, left, down, up, rest], dim=-1)


class ShiftMlp(nn.Module):
    """MLP with a parameter-free spatial shift on its hidden features (TCSR's "EFFN"), NHWC.

    ``fc2(drop(h + spatial_shift(h)))`` with ``h = act(fc1(x))``: the shifted copy adds each
    pixel's four neighbours to the pointwise MLP, the local aggregation a 3x3 depthwise conv gives
    other SR feed-forward layers, without its weights. Same signature as timm's ``Mlp``, so it
    plugs into :class:`~visattn.layers.blocks.NHWCTransformerBlock` as ``mlp_layer``.

    Input and output: ``[B, H, W, in_features]``.
    """

    def __init__(self, in_features: int, hidden_features: Optional[int] = None, out_features: Optional[int] = None,
                 act_layer: Type[nn.Module] = nn.GELU, drop: float = 0.0, shift: int = 1):
        super().__init__()
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.shift = shift
        self.drop = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_features, out_features or in_features)

    def extra_repr(self) -> str:
        return f"shift={self.shift}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.fc1(x))
        return self.fc2(self.drop(h + spatial_shift(h, self.shift)))
