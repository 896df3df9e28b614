"""Conventions shared by the super-resolution families.

Every visattn SR model takes RGB in **[0, 1]** ``[B, 3, H, W]`` of any size and returns
``[B, 3, scale*H, scale*W]`` in [0, 1] (not clamped). Families whose official code works on
[0, 255] (RCAN, HAN, A2N) scale inside ``forward``. Each SR model has an ``upscale`` attribute
(its scale factor), and its pretrained cfg carries ``mean=(0,0,0)``, ``std=(1,1,1)``, no classifier.
"""
from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import register_notrace_function
from timm.models import checkpoint_seq
from torch.fx._symbolic_trace import is_fx_symbolic_tracing

from visattn.convert import CheckpointMismatchError, check_state_dict, guess_family, remap_keys, unwrap_checkpoint
from visattn.layers.pixel_attention import PixelAttentionUpsampler, check_upsampler_stages
from visattn.models._common import check_image_batch

__all__ = ["PixelAttentionNet", "SRModel", "check_sr_input", "convert_pixel_attention_checkpoint", "pad_to_multiple", "sr_cfg"]


@torch.jit.ignore
def check_sr_input(x: torch.Tensor, in_chans: int, model_name: str) -> None:
    """Raise a ValueError unless ``x`` is a floating ``[B, in_chans, H, W]`` batch."""
    check_image_batch(x, in_chans, model_name)
    if is_fx_symbolic_tracing():  # shapes and dtypes are symbolic while torch.fx traces
        return
    if not x.is_floating_point():
        raise ValueError(f"{model_name} expects a floating-point image batch in [0, 1], got {x.dtype} "
                         f"(convert uint8 images with x.float() / 255, or use visattn.sr.upscale)")


@register_notrace_function  # shape-dependent padding: torch.fx records it as one call
def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Reflect-pad ``[B, C, H, W]`` right/bottom to multiples of ``multiple`` (HAT's test-time padding).

    Maps smaller than the padding they need are padded by mirrored copies (flip and concatenate),
    which reflect padding cannot do.
    """
    H, W = x.shape[-2:]
    pad_h, pad_w = (-H) % multiple, (-W) % multiple
    if pad_h == 0 and pad_w == 0:
        return x
    if pad_h < H and pad_w < W:
        return F.pad(x, (0, pad_w, 0, pad_h), mode="reflect")
    while x.shape[-2] < H + pad_h:
        x = torch.cat([x, x.flip(-2)], dim=-2)
    while x.shape[-1] < W + pad_w:
        x = torch.cat([x, x.flip(-1)], dim=-1)
    return x[..., : H + pad_h, : W + pad_w]


def sr_cfg(url: str = "", official: str = "", paper: str = "", scale: int = 4, license: Optional[str] = None,
           origin_url: str = "", first_conv: str = "conv_first", **kwargs) -> Dict:
    """A pretrained cfg of an SR model (no classifier, identity normalisation, 64x64 LR inputs)."""
    notes = [f"official name: {official}"] if official else []
    notes.append(f"super-resolution x{scale}: RGB in [0, 1] of any size -> x{scale} RGB in [0, 1]")
    cfg = dict(
        url=url, num_classes=0, input_size=(3, 64, 64), crop_pct=1.0, interpolation="bicubic",
        mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), first_conv=first_conv, classifier=None,
        license=license, paper_ids=paper, origin_url=origin_url, notes=tuple(notes),
    )
    cfg.update(kwargs)
    return cfg


def convert_pixel_attention_checkpoint(state_dict: Mapping, model: nn.Module, official_prefix: str, own_marker: str,
                                       rules: Sequence[Tuple[str, str]], family: str) -> Dict[str, torch.Tensor]:
    """The checkpoint filter of the PAN-skeleton families (PAN, A2N): official keys (recognised by
    ``official_prefix``) are renamed by ``rules``; visattn keys (a ``body.`` key containing
    ``own_marker``) pass unchanged; anything else, another scale's upsampler or a state dict that
    does not fit ``model`` exactly raises :class:`CheckpointMismatchError`.
    """
    state_dict = unwrap_checkpoint(state_dict)
    if any(k.startswith(official_prefix) for k in state_dict):
        state_dict = remap_keys(state_dict, rules)
    elif not any(k.startswith("body.") and own_marker in k for k in state_dict):
        raise CheckpointMismatchError(
            f"expected a {family} checkpoint (official or visattn), this one looks like: "
            f"{guess_family(state_dict) or 'unknown'} (first keys: {list(state_dict)[:3]})")
    check_upsampler_stages(state_dict, "tail.", model.upscale, family)
    check_state_dict(model, state_dict)
    return state_dict


class SRModel(nn.Module):
    """Base of the visattn SR models: timm's ``set_grad_checkpointing`` switch (the subclass's
    forward checks ``self.grad_checkpointing``) and ``no_weight_decay`` for relative position
    bias tables (the official transformer SR recipes exclude them; conv models have none)."""

    def __init__(self):
        super().__init__()
        self.grad_checkpointing = False

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the trunk's blocks in the backward pass instead of storing their activations."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {n for n, _ in self.named_parameters() if n.endswith(".rpb")}


class PixelAttentionNet(SRModel):
    """The PAN skeleton that PAN and A2N share: a 3x3 conv, ``depth`` blocks from ``block(dim)``
    and a 3x3 conv with a long residual, then the pixel-attention upsampling tail plus the bilinear
    input skip (:class:`~visattn.layers.pixel_attention.PixelAttentionUpsampler`).

    ``[B, in_chans, H, W]`` in [0, 1] -> ``[B, in_chans, sH, sW]`` in [0, 1] (not clamped);
    ``rgb_range`` is the range the official weights were trained on (the input is scaled to it and
    the output back).
    """

    def __init__(self, model_name: str, block: Callable[[int], nn.Module], upscale: int, in_chans: int,
                 embed_dim: int, upsample_dim: int, depth: int, num_classes: int, rgb_range: float,
                 device: Optional[torch.device], dtype: Optional[torch.dtype]):
        super().__init__()
        if num_classes != 0:
            raise ValueError(f"{model_name} is a super-resolution model without a classifier; got num_classes={num_classes}")
        self.model_name = model_name
        self.upscale, self.in_chans, self.rgb_range = upscale, in_chans, rgb_range
        self.conv_first = nn.Conv2d(in_chans, embed_dim, 3, padding=1)
        self.body = nn.Sequential(*[block(embed_dim) for _ in range(depth)])
        self.conv_body = nn.Conv2d(embed_dim, embed_dim, 3, padding=1)
        self.tail = PixelAttentionUpsampler(upscale, embed_dim, upsample_dim, in_chans)
        self.to(device=device, dtype=dtype)  # official init: PyTorch's defaults

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_sr_input(x, self.in_chans, self.model_name)
        if self.rgb_range != 1.0:
            x = x * self.rgb_range
        feat = self.conv_first(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            body = checkpoint_seq(self.body, feat)
        else:
            body = self.body(feat)
        out = self.tail(feat + self.conv_body(body), x)
        return out / self.rgb_range if self.rgb_range != 1.0 else out
