"""HAN: single image super-resolution via a holistic attention network (ECCV 2020, arXiv:2008.08767).

The RCAN trunk (:class:`visattn.models.rcan.RCAN`: mean shift, shallow conv, residual groups of
RCABs, body-closing conv, PixelShuffle upsampler, mean shift) with two attention modules between
the body and the upsampler:

* layer attention (LAM) over the stacked outputs of all residual groups and the body-closing conv
  (``num_groups + 1`` maps, newest first as the official ``torch.cat`` builds them), fused back to
  ``num_feats`` channels by a 3x3 conv;
* channel-spatial attention (CSAM, a 3x3x3 conv gate) on the body-closing conv's output;

the two are concatenated, fused by a 3x3 conv and added to the shallow features. Like RCAN, the
official code works on [0, 255]; visattn's HAN takes and returns RGB in [0, 1].

The official ``last_conv`` hard-codes ``n_feats * 11`` inputs, so the official HAN only runs with
10 residual groups (``from_official`` refuses other counts); visattn's ``layer_fuse`` takes
``num_feats * (num_groups + 1)``, the same conv for 10 groups.

Key map official -> visattn: the RCAN map (``visattn.models.rcan``) plus ``la`` -> ``layer_attn``,
``last_conv`` -> ``layer_fuse``, ``csa`` -> ``channel_spatial_attn``, ``last`` -> ``fuse``.
"""
from typing import Dict, Mapping, Optional

import torch
import torch.nn as nn
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from visattn.convert import register_official
from visattn.models._sr_common import sr_cfg
from visattn.models.rcan import DIV2K_RGB_MEAN, RCAN, filter_sr_checkpoint, official_args

__all__ = ["HAN", "LayerAttention", "ChannelSpatialAttention"]


class LayerAttention(nn.Module):
    """HAN's layer attention module: self-attention across ``N`` stacked feature maps.

    ``[B, N, C, H, W]`` -> ``[B, N*C, H, W]``: ``gamma * softmax(max(E) - E) @ X + X`` with
    ``E = X X^T`` over the flattened maps ``X`` ``[B, N, C*H*W]``.
    """

    def __init__(self):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1))  # official init: the module starts as the identity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C, H, W = x.shape
        flat = x.reshape(B, N, C * H * W)
        energy = torch.bmm(flat, flat.transpose(1, 2))
        # As the official code: max - energy, so the least correlated layers get the largest weights.
        attn = torch.softmax(energy.amax(-1, keepdim=True) - energy, dim=-1)
        out = torch.bmm(attn, flat).view(B, N, C, H, W)
        return (self.gamma * out + x).reshape(B, N * C, H, W)


class ChannelSpatialAttention(nn.Module):
    """HAN's channel-spatial attention module: a 3x3x3 conv over (channel, y, x) gives one sigmoid
    gate per channel and position; ``x + x * gamma * gate``. ``[B, C, H, W]`` in and out."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(1, 1, 3, padding=1)
        self.gamma = nn.Parameter(torch.zeros(1))  # official init: the module starts as the identity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.conv(x.unsqueeze(1))).squeeze(1)
        return x * (self.gamma * gate) + x


class HAN(RCAN):
    """HAN super-resolution model: RGB ``[B, 3, H, W]`` in [0, 1] -> ``[B, 3, upscale*H, upscale*W]``.

    Any ``H``, ``W``; the output is not clamped. Arguments as :class:`RCAN` (the official HAN always
    uses the DIV2K mean).
    """

    def __init__(self, upscale: int = 4, num_groups: int = 10, num_blocks: int = 20, num_feats: int = 64,
                 reduction: int = 16, rgb_range: float = 255.0, in_chans: int = 3, num_classes: int = 0,
                 device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None):
        super().__init__(upscale, num_groups, num_blocks, num_feats, reduction, rgb_range, DIV2K_RGB_MEAN,
                         in_chans, num_classes)
        self.layer_attn = LayerAttention()
        self.layer_fuse = nn.Conv2d(num_feats * (num_groups + 1), num_feats, 3, padding=1)
        self.channel_spatial_attn = ChannelSpatialAttention()
        self.fuse = nn.Conv2d(2 * num_feats, num_feats, 3, padding=1)
        self.to(device=device, dtype=dtype)

    def forward_body(self, feat: torch.Tensor) -> torch.Tensor:
        """Deep features: ``[B, num_feats, H, W]`` -> same shape (LAM and CSAM branches fused, plus the skip)."""
        outs = self.group_outputs(feat)
        last = self.conv_after_body(outs[-1])
        layers = torch.stack([last] + outs[::-1], dim=1)  # newest first, the official concatenation order
        fused = self.layer_fuse(self.layer_attn(layers))
        return feat + self.fuse(torch.cat([self.channel_spatial_attn(last), fused], dim=1))


def checkpoint_filter_fn(state_dict: Mapping, model: HAN) -> Dict[str, torch.Tensor]:
    """Map an official HAN state dict onto ``model`` (see :func:`visattn.models.rcan.filter_sr_checkpoint`)."""
    return filter_sr_checkpoint(state_dict, model, "HAN")


@register_official("src/model/han.py::HAN")
def _official_han(meta: Mapping) -> HAN:
    args = official_args(meta)
    if args["num_groups"] != 10:
        raise ValueError("the official HAN only runs with n_resgroups=10 (its last_conv hard-codes n_feats*11 "
                         f"inputs), got n_resgroups={args['num_groups']}")
    return HAN(**args)  # data_train is not read: the official HAN hard-codes the DIV2K mean


# ---------------------------------------------------------------------------------------------
# timm registration

def _create_han(variant: str, pretrained: bool = False, **kwargs) -> HAN:
    return build_model_with_cfg(HAN, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **kwargs)


def _cfg(scale: int) -> Dict:
    cfg = sr_cfg("", f"HAN_BIX{scale}", "arXiv:2008.08767", scale, "apache-2.0", "https://github.com/wwlCape/HAN")
    # The README links a Google Drive folder, not the files themselves.
    cfg["notes"] += (f"release file HAN_BIX{scale}.pt (plain state dict, BI degradation, DIV2K) in the Google Drive "
                     "folder https://drive.google.com/drive/folders/17cLcPCDLuBV5_5-ngd0vXIDp6rebIMG1",)
    return cfg


default_cfgs = generate_default_cfgs({f"visattn_han_x{s}.bi_div2k": _cfg(s) for s in (2, 3, 4, 8)})


@register_model
def visattn_han_x2(pretrained: bool = False, **kwargs) -> HAN:
    """HAN x2: 10 residual groups x 20 RCABs, 64 features, CA reduction 16, LAM + CSAM."""
    return _create_han("visattn_han_x2", pretrained, upscale=2, **kwargs)


@register_model
def visattn_han_x3(pretrained: bool = False, **kwargs) -> HAN:
    """HAN x3: 10 residual groups x 20 RCABs, 64 features, CA reduction 16, LAM + CSAM."""
    return _create_han("visattn_han_x3", pretrained, upscale=3, **kwargs)


@register_model
def visattn_han_x4(pretrained: bool = False, **kwargs) -> HAN:
    """HAN x4: 10 residual groups x 20 RCABs, 64 features, CA reduction 16, LAM + CSAM."""
    return _create_han("visattn_han_x4", pretrained, upscale=4, **kwargs)


@register_model
def visattn_han_x8(pretrained: bool = False, **kwargs) -> HAN:
    """HAN x8: 10 residual groups x 20 RCABs, 64 features, CA reduction 16, LAM + CSAM."""
    return _create_han("visattn_han_x8", pretrained, upscale=8, **kwargs)
