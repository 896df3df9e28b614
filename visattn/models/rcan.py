"""RCAN: very deep residual channel attention networks for super-resolution (Zhang et al., ECCV 2018).

A mean-shift 1x1 conv, a 3x3 conv (shallow features), ``num_groups`` residual groups of
``num_blocks`` RCABs (conv-ReLU-conv + channel attention) each closed by a 3x3 conv, a 3x3 conv with
a long skip over the whole body, a conv + PixelShuffle upsampler, a 3x3 conv to RGB and the inverse
mean shift. The official code works on [0, 255] (``rgb_range`` 255); visattn's RCAN takes and
returns RGB in [0, 1] and scales by ``rgb_range`` inside ``forward``.

Official checkpoints (EDSR-style plain state dicts, ``RCAN_BIX{2,3,4,8}.pt``) load through
:func:`checkpoint_filter_fn` / ``visattn.from_official``. Key map official -> visattn:
``head.0`` -> ``conv_first``; ``body.g.body.b.body.{0,2}`` -> ``body.g.blocks.b.conv{1,2}``;
``body.g.body.b.body.3.conv_du.{0,2}`` -> ``body.g.blocks.b.attn.fc{1,2}``; ``body.g.body.<n_blocks>``
-> ``body.g.conv``; ``body.<n_groups>`` -> ``conv_after_body``; ``tail.0.i`` -> ``upsample.i``;
``tail.1`` -> ``conv_last``; ``sub_mean`` / ``add_mean`` keep their names and their checkpoint values
(the official training left them trainable, so they may have drifted). HAN (``visattn.models.han``)
shares this trunk, the map and the checks.
"""
import re
from typing import Dict, List, Mapping, Optional, Sequence

import torch
import torch.nn as nn
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch.utils.checkpoint import checkpoint

from visattn.convert import CheckpointMismatchError, guess_family, register_official, unwrap_checkpoint
from visattn.layers.sr import MeanShift, PixelShuffleUpsampler, ResidualGroup
from visattn.models._sr_common import SRModel, check_sr_input, sr_cfg

__all__ = ["RCAN", "DIV2K_RGB_MEAN", "DF2K_RGB_MEAN"]

# Training-set RGB means of the official code (in [0, 1]; MeanShift scales them by rgb_range).
DIV2K_RGB_MEAN = (0.4488, 0.4371, 0.4040)
DF2K_RGB_MEAN = (0.4690, 0.4490, 0.4036)


class RCAN(SRModel):
    """RCAN super-resolution model: RGB ``[B, 3, H, W]`` in [0, 1] -> ``[B, 3, upscale*H, upscale*W]``.

    Any ``H``, ``W`` (the model is fully convolutional). The output is not clamped.
    """

    def __init__(
        self,
        upscale: int = 4,
        num_groups: int = 10,
        num_blocks: int = 20,
        num_feats: int = 64,
        reduction: int = 16,
        rgb_range: float = 255.0,
        rgb_mean: Sequence[float] = DIV2K_RGB_MEAN,
        in_chans: int = 3,
        num_classes: int = 0,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ):
        super().__init__()
        name = type(self).__name__
        # timm passes in_chans / num_classes from the pretrained cfg; reject anything else loudly.
        if in_chans != 3:
            raise ValueError(f"{name} works on RGB images (its mean-shift convs are 3->3): "
                             f"in_chans must be 3, got {in_chans}")
        if num_classes:
            raise ValueError(f"{name} is a super-resolution model without a classifier: "
                             f"num_classes must be 0, got {num_classes}")
        if num_groups < 1:
            raise ValueError(f"{name} needs at least one residual group, got num_groups={num_groups}")
        self.arch_name = name  # for error messages (TorchScript cannot evaluate type(self))
        self.upscale = int(upscale)
        self.rgb_range = float(rgb_range)
        self.in_chans, self.num_classes, self.num_features = 3, 0, num_feats
        self.sub_mean = MeanShift(rgb_range, rgb_mean, sign=-1)
        self.conv_first = nn.Conv2d(3, num_feats, 3, padding=1)
        self.body = nn.Sequential(*[ResidualGroup(num_feats, reduction, num_blocks) for _ in range(num_groups)])
        self.conv_after_body = nn.Conv2d(num_feats, num_feats, 3, padding=1)
        self.upsample = PixelShuffleUpsampler(self.upscale, num_feats)
        self.conv_last = nn.Conv2d(num_feats, 3, 3, padding=1)
        self.add_mean = MeanShift(rgb_range, rgb_mean, sign=1)
        self.to(device=device, dtype=dtype)

    def group_outputs(self, x: torch.Tensor) -> List[torch.Tensor]:
        """The output of every residual group, in order; each ``[B, num_feats, H, W]``."""
        outs = []
        for group in self.body:
            if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
                x = checkpoint(group, x, use_reentrant=False)
            else:
                x = group(x)
            outs.append(x)
        return outs

    def forward_body(self, feat: torch.Tensor) -> torch.Tensor:
        """Deep features with the long skip: ``[B, num_feats, H, W]`` -> same shape."""
        return feat + self.conv_after_body(self.group_outputs(feat)[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` RGB in [0, 1] -> ``[B, 3, upscale*H, upscale*W]`` RGB in [0, 1] (not clamped)."""
        check_sr_input(x, self.in_chans, self.arch_name)
        feat = self.conv_first(self.sub_mean(x * self.rgb_range))  # official code works on [0, rgb_range]
        x = self.conv_last(self.upsample(self.forward_body(feat)))
        return self.add_mean(x) / self.rgb_range


# ---------------------------------------------------------------------------------------------
# Checkpoint conversion (shared with HAN)

_OFFICIAL_RULES = (
    (r"^head\.0\.", "conv_first."),
    (r"^body\.(\d+)\.body\.(\d+)\.body\.0\.", r"body.\1.blocks.\2.conv1."),
    (r"^body\.(\d+)\.body\.(\d+)\.body\.2\.", r"body.\1.blocks.\2.conv2."),
    (r"^body\.(\d+)\.body\.(\d+)\.body\.3\.conv_du\.0\.", r"body.\1.blocks.\2.attn.fc1."),
    (r"^body\.(\d+)\.body\.(\d+)\.body\.3\.conv_du\.2\.", r"body.\1.blocks.\2.attn.fc2."),
    (r"^tail\.0\.", "upsample."),
    (r"^tail\.1\.", "conv_last."),
    # HAN only: layer attention, its fusion conv, channel-spatial attention, the final fusion conv.
    (r"^la\.", "layer_attn."),
    (r"^last_conv\.", "layer_fuse."),
    (r"^csa\.", "channel_spatial_attn."),
    (r"^last\.", "fuse."),
)
_HAN_PREFIXES = ("layer_attn.", "layer_fuse.", "channel_spatial_attn.", "fuse.")


def _convert_official(state_dict: Mapping[str, torch.Tensor], num_groups: int,
                      num_blocks: int) -> Dict[str, torch.Tensor]:
    """Rename official keys. The group-closing conv and the body-closing conv are plain indices in
    the official ``nn.Sequential``s, so they map only at the model's own ``num_blocks`` /
    ``num_groups``; keys that fit nowhere keep their name and are reported as unexpected."""
    out = {}
    for key, value in state_dict.items():
        new = key
        for pattern, repl in _OFFICIAL_RULES:
            new, n = re.subn(pattern, repl, key)
            if n:
                break
        else:
            group_conv = re.match(r"^body\.(\d+)\.body\.(\d+)\.(weight|bias)$", key)
            body_conv = re.match(r"^body\.(\d+)\.(weight|bias)$", key)
            if group_conv and int(group_conv[2]) == num_blocks:
                new = f"body.{group_conv[1]}.conv.{group_conv[3]}"
            elif body_conv and int(body_conv[1]) == num_groups:
                new = f"conv_after_body.{body_conv[2]}"
        out[new] = value
    return out


def _checkpoint_scale(state_dict: Mapping[str, torch.Tensor]) -> Optional[int]:
    """The upscale factor a (visattn-keyed) state dict's upsampler implements, or None if unclear."""
    convs = sorted((k for k in state_dict if re.fullmatch(r"upsample\.\d+\.weight", k)),
                   key=lambda k: int(k.split(".")[1]))
    if not convs or state_dict[convs[0]].dim() != 4:
        return None
    out_chs, in_chs = state_dict[convs[0]].shape[:2]
    if len(convs) == 1 and out_chs == 9 * in_chs:
        return 3
    if out_chs == 4 * in_chs:
        return 2 ** len(convs)
    return None


def filter_sr_checkpoint(state_dict: Mapping, model: RCAN, family: str) -> Dict[str, torch.Tensor]:
    """Map an official RCAN / HAN checkpoint onto ``model`` (``family`` 'RCAN' or 'HAN'); visattn
    state dicts pass unchanged. Wrapped / ``module.``-prefixed checkpoints are unwrapped.

    Raises :class:`CheckpointMismatchError` for a checkpoint of another family or another scale.
    """
    state_dict = unwrap_checkpoint(state_dict)
    official = "head.0.weight" in state_dict or any(k.startswith("tail.") for k in state_dict)
    if not official and "conv_first.weight" not in state_dict:
        raise CheckpointMismatchError(
            f"expected an official (EDSR-style) or visattn {family} checkpoint, this one looks like: "
            f"{guess_family(state_dict) or 'unknown'}")
    if any(".residual_group." in k for k in state_dict):  # BasicSR's RCAN: no mean-shift convs to read
        raise CheckpointMismatchError(
            f"this is a BasicSR-layout RCAN checkpoint (residual_group / rcab keys, no sub_mean / add_mean); "
            f"visattn loads the official EDSR-style {family} checkpoints")
    if official:
        state_dict = _convert_official(state_dict, len(model.body), len(model.body[0].blocks))
    found = "HAN" if any(k.startswith(_HAN_PREFIXES) for k in state_dict) else "RCAN"
    if found != family:
        raise CheckpointMismatchError(
            f"this is a {found} checkpoint but the model is {family}: build it with visattn_{found.lower()}_x* "
            f"or the official class of {found}")
    scale = _checkpoint_scale(state_dict)
    if scale is not None and scale != model.upscale:
        raise CheckpointMismatchError(
            f"this is a x{scale} {family} checkpoint but the model upscales x{model.upscale}: "
            f"use visattn_{family.lower()}_x{scale} (official scale [{scale}])")
    return state_dict


def checkpoint_filter_fn(state_dict: Mapping, model: RCAN) -> Dict[str, torch.Tensor]:
    """Map an official RCAN state dict onto ``model`` (see :func:`filter_sr_checkpoint`)."""
    return filter_sr_checkpoint(state_dict, model, "RCAN")


def official_args(meta: Mapping) -> Dict:
    """visattn kwargs from the official ``args_namespace`` (option.py defaults where a field is absent)."""
    ns = meta["constructor_kwargs"]["args_namespace"]
    scale = ns["scale"]
    scale = scale[0] if isinstance(scale, (list, tuple)) else scale  # official: args.scale[0]
    if ns.get("n_colors", 3) != 3:
        raise ValueError(f"visattn builds RGB models (n_colors 3), got n_colors={ns['n_colors']}")
    # res_scale is not read: the official RCAB never applies it.
    return dict(upscale=int(scale), num_groups=ns["n_resgroups"], num_blocks=ns["n_resblocks"],
                num_feats=ns["n_feats"], reduction=ns.get("reduction", 16), rgb_range=ns.get("rgb_range", 255))


@register_official("RCAN_TestCode/code/model/rcan.py::RCAN")
def _official_rcan(meta: Mapping) -> RCAN:
    data_train = meta["constructor_kwargs"]["args_namespace"].get("data_train", "DIV2K")
    means = {"DIV2K": DIV2K_RGB_MEAN, "DIVFlickr2K": DF2K_RGB_MEAN}
    if data_train not in means:  # the official constructor has no mean for other sets either
        raise ValueError(f"official RCAN knows the RGB means of {sorted(means)}, got data_train={data_train!r}")
    return RCAN(rgb_mean=means[data_train], **official_args(meta))


# ---------------------------------------------------------------------------------------------
# timm registration

def _create_rcan(variant: str, pretrained: bool = False, **kwargs) -> RCAN:
    return build_model_with_cfg(RCAN, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **kwargs)


def _cfg(scale: int) -> Dict:
    cfg = sr_cfg("", f"RCAN_BIX{scale}", "arXiv:1807.02758", scale, None, "https://github.com/yulunzhang/RCAN")
    # The release files are linked from the official README (Dropbox / Google Drive / Baidu), no direct URL.
    cfg["notes"] += (f"release file RCAN_BIX{scale}.pt: plain state dict (PyTorch 0.4 pickle), BI degradation, "
                     "DIV2K; the official repository has no LICENSE file",)
    return cfg


default_cfgs = generate_default_cfgs({f"visattn_rcan_x{s}.bi_div2k": _cfg(s) for s in (2, 3, 4, 8)})


@register_model
def visattn_rcan_x2(pretrained: bool = False, **kwargs) -> RCAN:
    """RCAN x2: 10 residual groups x 20 RCABs, 64 features, CA reduction 16."""
    return _create_rcan("visattn_rcan_x2", pretrained, upscale=2, **kwargs)


@register_model
def visattn_rcan_x3(pretrained: bool = False, **kwargs) -> RCAN:
    """RCAN x3: 10 residual groups x 20 RCABs, 64 features, CA reduction 16."""
    return _create_rcan("visattn_rcan_x3", pretrained, upscale=3, **kwargs)


@register_model
def visattn_rcan_x4(pretrained: bool = False, **kwargs) -> RCAN:
    """RCAN x4: 10 residual groups x 20 RCABs, 64 features, CA reduction 16."""
    return _create_rcan("visattn_rcan_x4", pretrained, upscale=4, **kwargs)


@register_model
def visattn_rcan_x8(pretrained: bool = False, **kwargs) -> RCAN:
    """RCAN x8: 10 residual groups x 20 RCABs, 64 features, CA reduction 16."""
    return _create_rcan("visattn_rcan_x8", pretrained, upscale=8, **kwargs)
