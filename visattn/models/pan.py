"""PAN: Pixel Attention Network for efficient image super-resolution.

Paper: "Efficient Image Super-Resolution Using Pixel Attention" (Zhao et al., ECCV 2020 workshops,
arXiv:2010.01073). Official code: https://github.com/zhaohengyuan1/PAN (no license file).

A 3x3 conv, ``depth`` SCPA blocks (self-calibrated convolution with pixel attention) and a 3x3 conv
with a long residual, then the UPA tail (nearest upsampling + conv + pixel attention + conv, see
:class:`~visattn.layers.pixel_attention.PixelAttentionUpsampler`) plus the bilinear input skip.
Input and output RGB in [0, 1] (the official range), any size.

Official checkpoints (plain state dicts, ``PANx{2,3,4}_DF2K.pth``) load through
:func:`checkpoint_filter_fn` / ``visattn.from_official``. Key mapping: ``SCPA_trunk.i`` -> ``body.i``
with ``conv1_a/conv1_b`` -> ``proj_a/proj_b``, ``k1.0`` -> ``conv_a``, ``PAConv.k2/k3/k4`` ->
``pa_conv.gate/conv/proj``, ``conv3`` -> ``fuse``; ``trunk_conv`` -> ``conv_body``; ``upconv{j}``,
``att{j}``, ``HRconv{j}`` -> ``tail.stages.{j-1}.conv/attn/refine``; ``conv_last`` -> ``tail.conv_last``.
"""
from pathlib import Path
from typing import Dict, Optional

import torch
import torch.nn as nn
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from visattn.convert import register_official
from visattn.layers.pixel_attention import OFFICIAL_UPSAMPLER_RULES, PixelAttentionConv
from visattn.models._sr_common import PixelAttentionNet, convert_pixel_attention_checkpoint, sr_cfg

__all__ = ["PAN", "SCPABlock"]


class SCPABlock(nn.Module):
    """Self-calibrated convolution with pixel attention (PAN's SCPA, reduction 2), residual.

    Two 1x1 convs split the input into halves; one half runs a plain 3x3 conv, the other a
    :class:`PixelAttentionConv`; a 1x1 conv fuses them. No biases except the PA gate's.
    Input and output ``[B, dim, H, W]``.
    """

    def __init__(self, dim: int):
        super().__init__()
        half = dim // 2
        self.proj_a = nn.Conv2d(dim, half, 1, bias=False)
        self.proj_b = nn.Conv2d(dim, half, 1, bias=False)
        self.conv_a = nn.Conv2d(half, half, 3, padding=1, bias=False)
        self.pa_conv = PixelAttentionConv(half)
        self.fuse = nn.Conv2d(2 * half, dim, 1, bias=False)
        self.act = nn.LeakyReLU(0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.act(self.conv_a(self.act(self.proj_a(x))))
        b = self.act(self.pa_conv(self.act(self.proj_b(x))))
        return x + self.fuse(torch.cat([a, b], dim=1))


class PAN(PixelAttentionNet):
    """PAN super-resolution network: ``[B, in_chans, H, W]`` in [0, 1] -> ``[B, in_chans, sH, sW]``
    in [0, 1] (not clamped), ``s = upscale``.

    Args:
        upscale: 2, 3 or 4.
        in_chans: image channels (the output has as many: the bilinear skip adds the input).
        embed_dim: trunk width (official ``nf``, 40).
        upsample_dim: width of the upsampling tail (official ``unf``, 24).
        depth: number of SCPA blocks (official ``nb``, 16).
        num_classes: only 0 (timm passes the cfg's value; an SR model has no classifier).
    """

    def __init__(self, upscale: int = 4, in_chans: int = 3, embed_dim: int = 40, upsample_dim: int = 24,
                 depth: int = 16, num_classes: int = 0, device: Optional[torch.device] = None,
                 dtype: Optional[torch.dtype] = None):
        super().__init__("PAN", SCPABlock, upscale, in_chans, embed_dim, upsample_dim, depth, num_classes,
                         rgb_range=1.0, device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# Checkpoint conversion

_RULES = (
    (r"^SCPA_trunk\.(\d+)\.conv1_a\.", r"body.\1.proj_a."),
    (r"^SCPA_trunk\.(\d+)\.conv1_b\.", r"body.\1.proj_b."),
    (r"^SCPA_trunk\.(\d+)\.k1\.0\.", r"body.\1.conv_a."),
    (r"^SCPA_trunk\.(\d+)\.PAConv\.k2\.", r"body.\1.pa_conv.gate."),
    (r"^SCPA_trunk\.(\d+)\.PAConv\.k3\.", r"body.\1.pa_conv.conv."),
    (r"^SCPA_trunk\.(\d+)\.PAConv\.k4\.", r"body.\1.pa_conv.proj."),
    (r"^SCPA_trunk\.(\d+)\.conv3\.", r"body.\1.fuse."),
    (r"^trunk_conv\.", "conv_body."),
    (r"^conv_last\.", "tail.conv_last."),
) + tuple((pattern, "tail." + repl) for pattern, repl in OFFICIAL_UPSAMPLER_RULES)


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Map an official PAN state dict onto ``model`` (visattn PAN state dicts pass unchanged).

    Raises :class:`CheckpointMismatchError` for a checkpoint of another family, of another scale
    (x4 vs x2/x3), or one that does not fit ``model`` exactly (so nothing loads partially).
    """
    return convert_pixel_attention_checkpoint(state_dict, model, "SCPA_trunk.", ".pa_conv.", _RULES, "PAN")


@register_official("codes/models/archs/PAN_arch.py::PAN")
def _official_pan(meta: Dict) -> PAN:
    kwargs = meta["constructor_kwargs"]
    if kwargs.get("in_nc", 3) != kwargs.get("out_nc", 3):
        raise ValueError(f"PAN adds the upsampled input to the output, so in_nc must equal out_nc; got {kwargs}")
    return PAN(upscale=kwargs.get("scale", 4), in_chans=kwargs.get("in_nc", 3), embed_dim=kwargs["nf"],
               upsample_dim=kwargs["unf"], depth=kwargs["nb"])


# ---------------------------------------------------------------------------------------------
# timm registration

def _create_pan(variant: str, pretrained: bool = False, **kwargs) -> PAN:
    return build_model_with_cfg(PAN, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **kwargs)


# Pinned to the commit the goldens were computed at; the weights are committed in the repository.
_PAN_URL = ("https://github.com/zhaohengyuan1/PAN/raw/4d045d18592c5771cd3990da88f292812774e538/"
            "experiments/pretrained_models/PANx{}_DF2K.pth")


def _cfg(scale: int) -> Dict:
    cfg = sr_cfg(_PAN_URL.format(scale), f"PANx{scale}_DF2K", "arXiv:2010.01073", scale, None,
                 "https://github.com/zhaohengyuan1/PAN")
    cfg["notes"] += ("trained on DF2K; plain state dict (legacy pickle)", "the official repository has no license file")
    return cfg


# Weights trained by visattn itself (train/sr.py) on scikit-image's bundled photos, shipped in the
# package so that an SR model works offline out of the box (held-out PSNR/SSIM in the README and
# in the .json beside each file).
BUNDLED_WEIGHTS = Path(__file__).resolve().parents[1] / "weights"


def _bundled_cfg(scale: int) -> Dict:
    cfg = sr_cfg("", "", "arXiv:2010.01073", scale, "mit", "https://github.com/zhaohengyuan1/PAN",
                 file=str(BUNDLED_WEIGHTS / f"pan_x{scale}_skimage.safetensors"))
    cfg["notes"] += (f"bundled with visattn: trained by train/sr.py on scikit-image photos "
                     f"(visattn/weights/pan_x{scale}_skimage.json has the command and held-out scores)",)
    return cfg


default_cfgs = generate_default_cfgs({
    **{f"visattn_pan_x{s}.df2k": _cfg(s) for s in (2, 3, 4)},
    **{f"visattn_pan_x{s}.skimage": _bundled_cfg(s) for s in (2, 4)},
})


@register_model
def visattn_pan_x2(pretrained: bool = False, **kwargs) -> PAN:
    """PAN x2 (official ``PANx2_DF2K``), 261,403 params."""
    return _create_pan("visattn_pan_x2", pretrained, **dict(dict(upscale=2), **kwargs))


@register_model
def visattn_pan_x3(pretrained: bool = False, **kwargs) -> PAN:
    """PAN x3 (official ``PANx3_DF2K``), 261,403 params."""
    return _create_pan("visattn_pan_x3", pretrained, **dict(dict(upscale=3), **kwargs))


@register_model
def visattn_pan_x4(pretrained: bool = False, **kwargs) -> PAN:
    """PAN x4 (official ``PANx4_DF2K``), 272,419 params."""
    return _create_pan("visattn_pan_x4", pretrained, **dict(dict(upscale=4), **kwargs))
