"""Pixel attention (PA) layers shared by PAN and A2N.

PAN ("Efficient Image Super-Resolution Using Pixel Attention", Zhao et al., ECCV 2020 workshops) gates
every pixel and channel of a map with a sigmoid of a 1x1 conv. A2N ("Attention in Attention Network
for Image Super-Resolution", Chen et al., arXiv:2104.09497) keeps PAN's skeleton, its gated-conv
attention branch (with an extra 3x3 conv in the gate) and its reconstruction tail (UPA), which live here.
"""
from typing import Mapping, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from visattn.convert import CheckpointMismatchError

__all__ = ["OFFICIAL_UPSAMPLER_RULES", "PixelAttention", "PixelAttentionConv", "PixelAttentionUpsampler",
           "check_upsampler_stages"]


class PixelAttention(nn.Module):
    """``x * sigmoid(conv1x1(x))``: a per-pixel, per-channel gate (PAN's ``PA``).

    Input and output ``[B, dim, H, W]``.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.conv(x))


class PixelAttentionConv(nn.Module):
    """A 3x3 conv gated by pixel attention, then a 3x3 conv: ``proj(conv(x) * sigmoid(gate(c)))``.

    The gate's input ``c`` is ``x`` itself (PAN's ``PAConv``), or with ``context_conv`` a 3x3 conv of
    ``x`` followed by LeakyReLU(0.2) (A2N's attention branch). Only the 1x1 gate has a bias, as in both
    official models. Input and output ``[B, dim, H, W]``.
    """

    def __init__(self, dim: int, context_conv: bool = False):
        super().__init__()
        self.context = nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1, bias=False),
                                     nn.LeakyReLU(0.2)) if context_conv else nn.Identity()
        self.gate = nn.Conv2d(dim, dim, 1)
        self.conv = nn.Conv2d(dim, dim, 3, padding=1, bias=False)
        self.proj = nn.Conv2d(dim, dim, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.conv(x) * torch.sigmoid(self.gate(self.context(x))))


class UpsampleStage(nn.Module):
    """Nearest upsampling by ``factor``, then ``conv -> PA -> LeakyReLU -> conv -> LeakyReLU``.

    ``[B, in_dim, H, W]`` -> ``[B, dim, factor*H, factor*W]``.
    """

    def __init__(self, in_dim: int, dim: int, factor: int):
        super().__init__()
        self.factor = factor
        self.conv = nn.Conv2d(in_dim, dim, 3, padding=1)
        self.attn = PixelAttention(dim)
        self.refine = nn.Conv2d(dim, dim, 3, padding=1)
        self.act = nn.LeakyReLU(0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=float(self.factor), mode="nearest")
        x = self.act(self.attn(self.conv(x)))
        return self.act(self.refine(x))


class PixelAttentionUpsampler(nn.Module):
    """PAN's reconstruction tail (UPA), shared by A2N, plus the bilinear skip of the LR input.

    Scale 2 or 3: one :class:`UpsampleStage` by ``scale``; scale 4: two x2 stages (nearest + conv
    keeps the tail small, where a pixel shuffle would need ``scale**2`` times the channels). Then a
    3x3 conv to ``out_chans``, added to the LR image upsampled bilinearly (align_corners=False), so
    the network only learns the residual detail.

    ``forward(feat [B, in_dim, H, W], lr [B, out_chans, H, W])`` -> ``[B, out_chans, scale*H, scale*W]``.
    """

    def __init__(self, scale: int, in_dim: int, dim: int, out_chans: int = 3):
        super().__init__()
        if scale not in (2, 3, 4):
            raise ValueError(f"PixelAttentionUpsampler: scale must be 2, 3 or 4 (as in PAN / A2N), got {scale}")
        self.scale = scale
        factors = (2, 2) if scale == 4 else (scale,)
        self.stages = nn.Sequential(*[UpsampleStage(in_dim if i == 0 else dim, dim, f) for i, f in enumerate(factors)])
        self.conv_last = nn.Conv2d(dim, out_chans, 3, padding=1)

    def forward(self, feat: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
        # scale_factor (not size) so the bilinear sampling grid is the official one bit for bit.
        skip = F.interpolate(lr, scale_factor=float(self.scale), mode="bilinear", align_corners=False)
        return self.conv_last(self.stages(feat)) + skip


# Official PAN / A2N tail keys -> PixelAttentionUpsampler keys (relative to the upsampler).
OFFICIAL_UPSAMPLER_RULES: Tuple[Tuple[str, str], ...] = (
    (r"^upconv1\.", "stages.0.conv."),
    (r"^att1\.conv\.", "stages.0.attn.conv."),
    (r"^HRconv1\.", "stages.0.refine."),
    (r"^upconv2\.", "stages.1.conv."),
    (r"^att2\.conv\.", "stages.1.attn.conv."),
    (r"^HRconv2\.", "stages.1.refine."),
)


def _stages(n: int) -> str:
    return f"{n} upsampling stage{'s' if n != 1 else ''}"


def check_upsampler_stages(state_dict: Mapping[str, torch.Tensor], prefix: str, scale: int, family: str) -> None:
    """Raise :class:`CheckpointMismatchError` unless ``state_dict`` (visattn keys, the upsampler under
    ``prefix``) has as many upsampling stages as a x``scale`` upsampler.

    x4 checkpoints have two stages (official ``upconv2`` / ``att2`` / ``HRconv2``), x2 and x3 one; x2 and
    x3 checkpoints have the same keys and shapes and cannot be told apart.
    """
    found = len({key[len(prefix):].split(".")[1] for key in state_dict if key.startswith(prefix + "stages.")})
    expected = 2 if scale == 4 else 1
    if found != expected:
        kind = {1: "x2/x3", 2: "x4"}.get(found, "unknown-scale")
        raise CheckpointMismatchError(
            f"scale mismatch: the checkpoint is a {kind} {family} checkpoint ({_stages(found)}, "
            f"{'with' if found > 1 else 'no'} upconv2/att2/HRconv2) but the model is x{scale} ({_stages(expected)}); "
            f"build the model at the checkpoint's scale")
