"""A2N: Attention in Attention Network for image super-resolution (official class name ``AAN``).

Paper: "Attention in Attention Network for Image Super-Resolution" (Chen et al., arXiv:2104.09497).
Official code: https://github.com/haoyuc/A2N (EDSR framework; no license file).

PAN's skeleton (3x3 conv, ``depth`` blocks, 3x3 conv with a long residual, the UPA tail and the
bilinear input skip) with attention-in-attention blocks (AAB): an attention-dropout module predicts,
per image, softmax weights (temperature 30) that mix a pixel-attention branch with a plain 3x3 conv
branch, so each block learns how much attention to use.

The official model works on RGB in [0, 255] (no MeanShift); visattn's takes and returns [0, 1] and
scales inside ``forward``. Official checkpoints (plain state dicts ``aan_x{2,3,4}.pt``) load through
:func:`checkpoint_filter_fn` / ``visattn.from_official``. Key mapping: ``AAB_trunk.i`` -> ``body.i``
with ``conv_first/conv_last`` -> ``proj_in/proj_out``, ``ADM.0/ADM.2`` -> ``branch_weights.fc1/fc2``,
``attention.k1/k2/k3/k4`` -> ``attn.context.0/gate/conv/proj``, ``non_attention`` -> ``non_attn``;
``trunk_conv`` -> ``conv_body``; the tail as in PAN (``upconv{j}``, ``att{j}``, ``HRconv{j}``,
``conv_last`` -> ``tail.*``).
"""
import re
from typing import Dict, Mapping, Optional

import torch
import torch.nn as nn
from timm.layers import Mlp
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from visattn.convert import register_official
from visattn.layers.pixel_attention import OFFICIAL_UPSAMPLER_RULES, PixelAttentionConv
from visattn.models._sr_common import PixelAttentionNet, convert_pixel_attention_checkpoint, sr_cfg

__all__ = ["A2N", "AttentionInAttentionBlock"]

class AttentionInAttentionBlock(nn.Module):
    """A2N's AAB: ``x + proj_out(lrelu(w0 * attn(y) + w1 * non_attn(y)))`` with ``y = lrelu(proj_in(x))``.

    ``(w0, w1) = softmax(branch_weights(mean_hw(y)) / temperature)`` per image (the official
    "attention dropout" module: Linear ``dim -> dim // reduction`` -> ReLU -> Linear ``-> 2``, no biases).
    The attention branch is a :class:`PixelAttentionConv` with a 3x3 context conv in its gate.
    Input and output ``[B, dim, H, W]``.
    """

    def __init__(self, dim: int, reduction: int = 4, temperature: float = 30.0):
        super().__init__()
        self.temperature = temperature
        self.proj_in = nn.Conv2d(dim, dim, 1, bias=False)
        self.branch_weights = Mlp(dim, dim // reduction, 2, act_layer=nn.ReLU, bias=False)
        self.attn = PixelAttentionConv(dim, context_conv=True)
        self.non_attn = nn.Conv2d(dim, dim, 3, padding=1, bias=False)
        self.proj_out = nn.Conv2d(dim, dim, 1, bias=False)
        self.act = nn.LeakyReLU(0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.proj_in(x))
        # A high temperature keeps the two weights soft (both branches stay in use).
        w = torch.softmax(self.branch_weights(y.mean((2, 3))) / self.temperature, dim=1)[:, :, None, None]
        y = self.attn(y) * w[:, 0:1] + self.non_attn(y) * w[:, 1:2]
        return x + self.proj_out(self.act(y))


class A2N(PixelAttentionNet):
    """A2N super-resolution network: ``[B, in_chans, H, W]`` in [0, 1] -> ``[B, in_chans, sH, sW]``
    in [0, 1] (not clamped), ``s = upscale``.

    Args:
        upscale: 2, 3 or 4.
        in_chans: image channels (the output has as many: the bilinear skip adds the input).
        embed_dim: trunk width (official ``nf``, hard-coded 40).
        upsample_dim: width of the upsampling tail (official ``unf``, hard-coded 24).
        depth: number of AAB blocks (official ``nb``, hard-coded 16).
        num_classes: only 0 (timm passes the cfg's value; an SR model has no classifier).
    """

    def __init__(self, upscale: int = 4, in_chans: int = 3, embed_dim: int = 40, upsample_dim: int = 24,
                 depth: int = 16, num_classes: int = 0, device: Optional[torch.device] = None,
                 dtype: Optional[torch.dtype] = None):
        # The official weights were trained on [0, 255] images (EDSR's rgb_range).
        super().__init__("A2N", AttentionInAttentionBlock, upscale, in_chans, embed_dim, upsample_dim, depth,
                         num_classes, rgb_range=255.0, device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# Checkpoint conversion

_RULES = (
    (r"^AAB_trunk\.(\d+)\.conv_first\.", r"body.\1.proj_in."),
    (r"^AAB_trunk\.(\d+)\.conv_last\.", r"body.\1.proj_out."),
    (r"^AAB_trunk\.(\d+)\.ADM\.0\.", r"body.\1.branch_weights.fc1."),
    (r"^AAB_trunk\.(\d+)\.ADM\.2\.", r"body.\1.branch_weights.fc2."),
    (r"^AAB_trunk\.(\d+)\.attention\.k1\.", r"body.\1.attn.context.0."),
    (r"^AAB_trunk\.(\d+)\.attention\.k2\.", r"body.\1.attn.gate."),
    (r"^AAB_trunk\.(\d+)\.attention\.k3\.", r"body.\1.attn.conv."),
    (r"^AAB_trunk\.(\d+)\.attention\.k4\.", r"body.\1.attn.proj."),
    (r"^AAB_trunk\.(\d+)\.non_attention\.", r"body.\1.non_attn."),
    (r"^trunk_conv\.", "conv_body."),
    (r"^conv_last\.", "tail.conv_last."),
) + tuple((pattern, "tail." + repl) for pattern, repl in OFFICIAL_UPSAMPLER_RULES)


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Map an official A2N (``AAN``) state dict onto ``model`` (visattn A2N state dicts pass unchanged).

    Raises :class:`CheckpointMismatchError` for a checkpoint of another family, of another scale
    (x4 vs x2/x3), or one that does not fit ``model`` exactly (so nothing loads partially).
    """
    return convert_pixel_attention_checkpoint(state_dict, model, "AAB_trunk.", ".branch_weights.", _RULES, "A2N")


def _official_depth(meta: Mapping) -> int:
    """AAN hard-codes 16 blocks; a reduced golden says in ``meta['reduction']`` how it cut the trunk
    (``model.AAB_trunk = nn.Sequential(*list(model.AAB_trunk)[:N])``)."""
    cut = re.search(r"AAB_trunk\)\[:(\d+)\]", str(meta.get("reduction", "")))
    return int(cut.group(1)) if cut else 16


@register_official("code/model/aan.py::AAN")
def _official_a2n(meta: Dict) -> A2N:
    # AAN(args) reads only args.scale (a list, EDSR-style); nf 40, unf 24 and nb 16 are hard-coded.
    scale = meta["constructor_kwargs"]["args_namespace"]["scale"]
    return A2N(upscale=scale[0] if isinstance(scale, (list, tuple)) else scale, depth=_official_depth(meta))


# ---------------------------------------------------------------------------------------------
# timm registration

def _create_a2n(variant: str, pretrained: bool = False, **kwargs) -> A2N:
    return build_model_with_cfg(A2N, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **kwargs)


# Pinned to the commit the goldens were computed at; the x2/x3 weights are committed in the repository.
_A2N_URL = "https://github.com/haoyuc/A2N/raw/210b38cbe721f0283aa5ad20c98373c5822f917a/code/experiment/model/aan_x{}.pt"


def _cfg(scale: int) -> Dict:
    # aan_x4.pt is listed in the repository tree, but its blob was not retrievable to check: no URL.
    url = _A2N_URL.format(scale) if scale in (2, 3) else ""
    cfg = sr_cfg(url, f"aan_x{scale}", "arXiv:2104.09497", scale, None, "https://github.com/haoyuc/A2N")
    cfg["notes"] += ("trained on DIV2K; plain state dict (legacy pickle); official input range [0, 255]",
                     "the official repository has no license file")
    if not url:
        cfg["notes"] += (f"release file code/experiment/model/aan_x{scale}.pt (listed in the repository tree; "
                         "its blob is missing from the snapshot checked, so no download URL is given)",)
    return cfg


default_cfgs = generate_default_cfgs({f"visattn_a2n_x{s}.div2k": _cfg(s) for s in (2, 3, 4)})


@register_model
def visattn_a2n_x2(pretrained: bool = False, **kwargs) -> A2N:
    """A2N x2 (official ``aan_x2.pt``), 1,036,443 params."""
    return _create_a2n("visattn_a2n_x2", pretrained, **dict(dict(upscale=2), **kwargs))


@register_model
def visattn_a2n_x3(pretrained: bool = False, **kwargs) -> A2N:
    """A2N x3 (official ``aan_x3.pt``), 1,036,443 params."""
    return _create_a2n("visattn_a2n_x3", pretrained, **dict(dict(upscale=3), **kwargs))


@register_model
def visattn_a2n_x4(pretrained: bool = False, **kwargs) -> A2N:
    """A2N x4 (official ``aan_x4.pt``; no download URL: its blob was missing), 1,047,459 params."""
    return _create_a2n("visattn_a2n_x4", pretrained, **dict(dict(upscale=4), **kwargs))
