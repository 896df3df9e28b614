"""TCSR: transformer designs in a lightweight super-resolution network, on neighborhood attention.

Paper: "Incorporating Transformer Designs into Convolutions for Lightweight Image Super-Resolution"
(Wu, Jiang, Bai, Liu, arXiv:2303.14324). The authors' repository (https://github.com/Aitical/TCSR,
MIT) holds a README only: no code, no weights. visattn builds the network from the paper's
description:

* a neighborhood-attention (NA) module in place of a large-kernel convolution: pre-norm
  ``qkv`` -> ``visattn.kernels.na2d`` (kernel 7, relative position bias) -> ``proj``
  (:class:`~visattn.layers.neighborhood_attention.NeighborhoodAttention2d`);
* an enhanced feed-forward network (EFFN) whose hidden features are aggregated by a parameter-free
  spatial shift (:class:`~visattn.layers.spatial_shift.ShiftMlp`);
* the lightweight-SR macro layout its authors use in their follow-up CFSR and that SwinIR-light
  uses: 3x3 conv, residual groups of blocks each closed by a 3x3 conv, LayerNorm, 3x3 conv with a
  long residual, one conv + PixelShuffle to the output.

Widths and depths are not given in the text available to visattn, so they were chosen to match the
published parameter counts at x4: TCSR-B 686,768 (paper 682K, +0.7%), TCSR-L 1,033,808 (paper
1,030K, +0.4%), with head_dim 16 (a size the Triton kernels take). No released weights exist, so
these models start untrained (``train/sr.py`` trains them).

Input: RGB in [0, 1] of any size (``[B, 3, H, W]``); output ``[B, 3, sH, sW]`` in [0, 1], not clamped.
"""
from typing import Dict, Optional, Sequence

import torch
import torch.nn as nn
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model

from visattn.convert import check_state_dict, unwrap_checkpoint
from visattn.layers.blocks import NHWCTransformerBlock
from visattn.layers.neighborhood_attention import NeighborhoodAttention2d
from visattn.layers.norm import LayerNorm
from visattn.layers.spatial_shift import ShiftMlp
from visattn.models._common import drop_path_schedule, init_transformer_weights
from visattn.models._sr_common import SRModel, check_sr_input, sr_cfg

__all__ = ["TCSR"]

_RGB_MEAN = (0.4488, 0.4371, 0.4040)  # DIV2K mean, subtracted inside the model as in SwinIR / CFSR


class TCSRGroup(nn.Module):
    """Residual group on ``[B, H, W, C]``: ``depth`` NA + EFFN blocks, a 3x3 conv, plus the input."""

    def __init__(self, dim: int, depth: int, num_heads: int, kernel_size: int, mlp_ratio: float,
                 drop_path: Sequence[float], backend: str):
        super().__init__()
        self.blocks = nn.Sequential(*[
            NHWCTransformerBlock(dim, NeighborhoodAttention2d(dim, num_heads, kernel_size, backend=backend),
                                 mlp_ratio, drop_path=drop_path[i], mlp_layer=ShiftMlp, autocast_norm_output=True)
            for i in range(depth)
        ])
        self.conv = nn.Conv2d(dim, dim, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.blocks(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1) + x


class TCSR(SRModel):
    """TCSR super-resolution network: ``[B, in_chans, H, W]`` in [0, 1] -> ``[B, in_chans, sH, sW]``.

    Args:
        upscale: 2, 3 or 4 (one conv + PixelShuffle of that factor).
        in_chans: image channels.
        embed_dim: trunk width.
        depths: blocks per residual group.
        num_heads: attention heads per group.
        kernel_size: neighborhood size of the NA modules (odd).
        mlp_ratio: EFFN hidden width / ``embed_dim``.
        img_range: the range the network computes in (the input is scaled to it and back).
        drop_path_rate: stochastic depth, rising linearly over the blocks.
        backend: ``visattn.kernels.na2d`` backend (``auto``: Triton on CUDA, reference on CPU).
        num_classes: only 0 (timm passes the cfg's value; an SR model has no classifier).
    """

    def __init__(
        self,
        upscale: int = 4,
        in_chans: int = 3,
        embed_dim: int = 64,
        depths: Sequence[int] = (8, 8),
        num_heads: Sequence[int] = (4, 4),
        kernel_size: int = 7,
        mlp_ratio: float = 2.0,
        img_range: float = 1.0,
        drop_path_rate: float = 0.0,
        backend: str = "auto",
        num_classes: int = 0,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ):
        super().__init__()
        if num_classes != 0:
            raise ValueError(f"TCSR is a super-resolution model without a classifier; got num_classes={num_classes}")
        if upscale not in (2, 3, 4):
            raise ValueError(f"TCSR: upscale must be 2, 3 or 4, got {upscale}")
        if len(depths) != len(num_heads):
            raise ValueError(f"depths {tuple(depths)} and num_heads {tuple(num_heads)} must have the same length")
        self.upscale, self.in_chans, self.img_range = upscale, in_chans, img_range
        self.num_features = embed_dim
        mean = torch.tensor(_RGB_MEAN).view(1, 3, 1, 1) if in_chans == 3 else torch.zeros(1, 1, 1, 1)
        self.register_buffer("mean", mean, persistent=False)

        self.conv_first = nn.Conv2d(in_chans, embed_dim, 3, padding=1)
        rates = drop_path_schedule(drop_path_rate, sum(depths))
        self.groups = nn.Sequential(*[
            TCSRGroup(embed_dim, depth, heads, kernel_size, mlp_ratio,
                      rates[sum(depths[:i]):sum(depths[:i + 1])], backend)
            for i, (depth, heads) in enumerate(zip(depths, num_heads))
        ])
        self.norm = LayerNorm(embed_dim)
        self.conv_after_body = nn.Conv2d(embed_dim, embed_dim, 3, padding=1)
        self.upsample = nn.Sequential(nn.Conv2d(embed_dim, in_chans * upscale ** 2, 3, padding=1),
                                      nn.PixelShuffle(upscale))
        self.apply(init_transformer_weights)
        self.to(device=device, dtype=dtype)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict:
        return dict(stem=r"^conv_first", blocks=r"^groups\.(\d+)" if coarse else [
            (r"^groups\.(\d+)\.blocks\.(\d+)", None), (r"^groups\.(\d+)\.conv", (99998,)),
            (r"^norm|^conv_after_body|^upsample", (99999,))])

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Deep features: shallow features ``[B, embed_dim, H, W]`` -> ``[B, embed_dim, H, W]``."""
        x = x.permute(0, 2, 3, 1)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.groups, x)
        else:
            x = self.groups(x)
        return self.norm(x).permute(0, 3, 1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, in_chans, H, W]`` in [0, 1] -> ``[B, in_chans, upscale*H, upscale*W]``."""
        check_sr_input(x, self.in_chans, "TCSR")
        x = (x - self.mean) * self.img_range
        x = self.conv_first(x)
        x = self.upsample(self.conv_after_body(self.forward_features(x)) + x)
        return x / self.img_range + self.mean


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: TCSR) -> Dict[str, torch.Tensor]:
    """visattn TCSR state dicts (plain, BasicSR ``params_ema`` / ``params``, ``module.``-prefixed)
    load as they are; one that does not fit ``model`` exactly raises (no official release exists)."""
    state_dict = unwrap_checkpoint(state_dict)
    check_state_dict(model, state_dict)
    return state_dict


def _create_tcsr(variant: str, pretrained: bool = False, **kwargs) -> TCSR:
    return build_model_with_cfg(TCSR, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **kwargs)


def _cfg(size: str, scale: int) -> Dict:
    cfg = sr_cfg(official=f"TCSR-{size.upper()} x{scale}", paper="arXiv:2303.14324", scale=scale, license="mit", origin_url="https://github.com/Aitical/TCSR")
    cfg["notes"] += ("no released weights: built from the paper's description, widths and depths chosen to "
                     "match its parameter counts",)
    return cfg


default_cfgs = generate_default_cfgs({f"visattn_tcsr_{size}_x{s}": _cfg(size, s) for size in ("b", "l") for s in (2, 3, 4)})

_SIZES = {
    "b": dict(embed_dim=64, depths=(8, 8), num_heads=(4, 4)),
    "l": dict(embed_dim=64, depths=(6, 6, 6, 6), num_heads=(4, 4, 4, 4)),
}


def _tcsr(size: str, scale: int, **kwargs) -> Dict:
    return {**_SIZES[size], "upscale": scale, **kwargs}


@register_model
def visattn_tcsr_b_x2(pretrained: bool = False, **kwargs) -> TCSR:
    """TCSR-B x2, 665,996 params."""
    return _create_tcsr("visattn_tcsr_b_x2", pretrained, **_tcsr("b", 2, **kwargs))


@register_model
def visattn_tcsr_b_x3(pretrained: bool = False, **kwargs) -> TCSR:
    """TCSR-B x3, 674,651 params."""
    return _create_tcsr("visattn_tcsr_b_x3", pretrained, **_tcsr("b", 3, **kwargs))


@register_model
def visattn_tcsr_b_x4(pretrained: bool = False, **kwargs) -> TCSR:
    """TCSR-B x4, 686,768 params (paper: 682K)."""
    return _create_tcsr("visattn_tcsr_b_x4", pretrained, **_tcsr("b", 4, **kwargs))


@register_model
def visattn_tcsr_l_x2(pretrained: bool = False, **kwargs) -> TCSR:
    """TCSR-L x2, 1,013,036 params."""
    return _create_tcsr("visattn_tcsr_l_x2", pretrained, **_tcsr("l", 2, **kwargs))


@register_model
def visattn_tcsr_l_x3(pretrained: bool = False, **kwargs) -> TCSR:
    """TCSR-L x3, 1,021,691 params."""
    return _create_tcsr("visattn_tcsr_l_x3", pretrained, **_tcsr("l", 3, **kwargs))


@register_model
def visattn_tcsr_l_x4(pretrained: bool = False, **kwargs) -> TCSR:
    """TCSR-L x4, 1,033,808 params (paper: 1,030K)."""
    return _create_tcsr("visattn_tcsr_l_x4", pretrained, **_tcsr("l", 4, **kwargs))
