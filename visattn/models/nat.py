"""Neighborhood Attention Transformers: NAT, DiNAT, DiNAT_s, isotropic NAT/DiNAT and ViT-rpb.

Papers: "Neighborhood Attention Transformer" (arXiv:2204.07143, CVPR 2023) and
"Dilated Neighborhood Attention Transformer" (arXiv:2209.15001).
Official code: https://github.com/SHI-Labs/Neighborhood-Attention-Transformer

Models run channels-last (NHWC) like the official code. Official checkpoints load through
``checkpoint_filter_fn``; the key mapping is:

* hierarchical: ``patch_embed.proj.{0,1}`` -> ``stem.conv{1,2}`` (NAT) or ``patch_embed.proj`` ->
  ``stem.proj`` (DiNAT_s); ``levels.i`` / ``layers.i`` -> ``stages.i``; the downsampler at the end of
  official level ``i`` -> ``stages.{i+1}.downsample``; ``gamma1/2`` -> ``ls1/2.gamma``; ``head`` ->
  ``head.fc``; dense backbones' ``norm{i}`` -> ``out_norms.{i}``;
* isotropic: ``patch_embed`` -> ``stem``; ``layers.i`` -> ``blocks.i``; ViT-rpb's
  ``relative_position_index`` buffers are checked against the recomputed index and dropped.
"""

import re
from typing import Dict, List, Optional, Sequence, Tuple, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import ClassifierHead, get_device_dtype, to_2tuple
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models.swin_transformer import PatchMerging

from visattn.convert import CheckpointMismatchError, guess_family, register_official, rename_key, unwrap_checkpoint
from visattn.models._common import check_image_batch, drop_path_schedule, init_transformer_weights, trunk_intermediates
from visattn.layers import GlobalAttentionRPB, LayerNorm, NeighborhoodAttention2d, NHWCTransformerBlock, relative_position_index

__all__ = ["NAT", "NATIsotropic", "NATDenseBackbone"]


class ConvStem(nn.Module):
    """NAT tokenizer: two 3x3 stride-2 convs (no activation between them), then LayerNorm.

    ``[B, C_in, H, W]`` -> ``[B, ceil(H/4), ceil(W/4), dim]``.
    """

    def __init__(self, in_chans: int, dim: int, norm_layer: Type[nn.Module] = LayerNorm):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, dim // 2, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(dim // 2, dim, 3, stride=2, padding=1)
        self.norm = norm_layer(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv2(self.conv1(x)).permute(0, 2, 3, 1))


class PatchStem(nn.Module):
    """Non-overlapping patchify conv (input zero-padded right/bottom to a multiple of the patch),
    then LayerNorm. ``[B, C_in, H, W]`` -> ``[B, ceil(H/p), ceil(W/p), dim]``."""

    def __init__(self, in_chans: int, dim: int, patch_size: int = 4, norm_layer: Type[nn.Module] = LayerNorm):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, dim, patch_size, stride=patch_size)
        self.norm = norm_layer(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-2:]
        x = F.pad(x, (0, (-W) % self.patch_size, 0, (-H) % self.patch_size))
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class ConvDownsample(nn.Module):
    """NAT downsampler: 3x3 stride-2 conv without bias, then LayerNorm. NHWC in and out."""

    def __init__(self, dim: int, out_dim: int, norm_layer: Type[nn.Module] = LayerNorm):
        super().__init__()
        self.reduction = nn.Conv2d(dim, out_dim, 3, stride=2, padding=1, bias=False)
        self.norm = norm_layer(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.reduction(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


def alternating_dilations(depths: Sequence[int], stage_dilations: Sequence[int]) -> List[List[int]]:
    """DiNAT's schedule: blocks alternate dilation 1 (even) and the stage's dilation (odd)."""
    return [[1 if j % 2 == 0 else d for j in range(depth)] for depth, d in zip(depths, stage_dilations)]


class NATStage(nn.Module):
    """Optional downsampler followed by ``depth`` neighborhood-attention blocks (NHWC)."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        kernel_size: int,
        dilations: Sequence[int],
        downsample: Optional[nn.Module],
        mlp_ratio: float,
        layer_scale: Optional[float],
        drop_path: Sequence[float],
        proj_drop: float,
        norm_layer: Type[nn.Module],
    ):
        super().__init__()
        self.grad_checkpointing = False
        self.downsample = downsample if downsample is not None else nn.Identity()
        self.blocks = nn.Sequential(
            *[
                NHWCTransformerBlock(
                    dim,
                    NeighborhoodAttention2d(dim, num_heads, kernel_size, dilation=dilations[j], proj_drop=proj_drop),
                    mlp_ratio=mlp_ratio,
                    layer_scale=layer_scale,
                    drop_path=drop_path[j],
                    proj_drop=proj_drop,
                    norm_layer=norm_layer,
                    autocast_norm_output=True,  # the norms feed only qkv / fc1 (after a pad)
                )
                for j in range(depth)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


class _NHWCClassifier(nn.Module):
    """timm API shared by the NAT-family classifiers: an NHWC trunk (``self.<trunk_attr>``, a
    Sequential of stages or blocks), a final ``norm`` and a ``ClassifierHead`` named ``head``."""

    trunk_attr = "stages"
    norm_every_tap = False  # timm convention: hierarchical nets norm only the last tap, isotropic ones every tap

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {n for n, _ in self.named_parameters() if n.endswith(".rpb")}

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        # The new head follows the trunk's device/dtype, not the old (possibly parameter-free) head's.
        self.head.reset(num_classes, pool_type=global_pool, **get_device_dtype(self))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, List[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Outputs of the trunk's stages (or blocks) as ``[B, C, H, W]`` maps (``output_fmt='NHWC'``
        keeps channels last), plus the final ``forward_features`` output unless ``intermediates_only``."""
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        check_image_batch(x, self.in_chans, type(self).__name__)
        last_idx = len(getattr(self, self.trunk_attr)) - 1

        def tap(i: int, feat: torch.Tensor) -> torch.Tensor:
            feat = self.norm(feat) if norm and (self.norm_every_tap or i == last_idx) else feat
            return feat.permute(0, 3, 1, 2) if output_fmt == "NCHW" else feat

        x, intermediates, reached_end = trunk_intermediates(
            x, self.stem, getattr(self, self.trunk_attr), indices, stop_early, tap)
        if intermediates_only:
            return intermediates
        if reached_end:
            x = self.norm(x)
        return x, intermediates

    def prune_intermediate_layers(
        self, indices: Union[int, List[int]] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> List[int]:
        trunk = getattr(self, self.trunk_attr)
        take_indices, max_index = feature_take_indices(len(trunk), indices)
        setattr(self, self.trunk_attr, trunk[: max_index + 1])
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=True) if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class NAT(_NHWCClassifier):
    """Hierarchical NAT / DiNAT (conv stem and conv downsamplers) or DiNAT_s (patch stem and
    Swin patch merging). Four stages at strides 4, 8, 16, 32; widths ``embed_dim * 2**i``.

    ``forward_features`` returns NHWC ``[B, H/32, W/32, num_features]``.
    """

    def __init__(
        self,
        depths: Sequence[int] = (3, 4, 18, 5),
        num_heads: Sequence[int] = (2, 4, 8, 16),
        embed_dim: int = 64,
        mlp_ratio: float = 3.0,
        kernel_size: int = 7,
        dilations: Optional[Sequence[Sequence[int]]] = None,
        layer_scale: Optional[float] = None,
        stem_type: str = "conv",
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        drop_path_rate: float = 0.2,
        norm_layer: Type[nn.Module] = LayerNorm,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ):
        super().__init__()
        if stem_type not in ("conv", "patch"):
            raise ValueError(f"stem_type must be 'conv' (NAT/DiNAT) or 'patch' (DiNAT_s), got {stem_type!r}")
        num_stages = len(depths)
        if len(num_heads) != num_stages or (dilations is not None and len(dilations) != num_stages):
            raise ValueError(f"depths {depths}, num_heads {num_heads} and dilations must have one entry per stage")
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.output_fmt = "NHWC"
        dims = [embed_dim * 2**i for i in range(num_stages)]
        self.num_features = self.head_hidden_size = dims[-1]
        dilations = dilations or [[1] * d for d in depths]

        if stem_type == "conv":
            self.stem = ConvStem(in_chans, embed_dim, norm_layer)
        else:
            self.stem = PatchStem(in_chans, embed_dim, 4, norm_layer)
        dpr = drop_path_schedule(drop_path_rate, sum(depths))
        dpr = [dpr[sum(depths[:i]) : sum(depths[: i + 1])] for i in range(num_stages)]
        stages, self.feature_info = [], []
        for i in range(num_stages):
            downsample = None
            if i > 0:
                if stem_type == "conv":
                    downsample = ConvDownsample(dims[i - 1], dims[i], norm_layer)
                else:
                    downsample = PatchMerging(dims[i - 1], dims[i], norm_layer=norm_layer)
            stages.append(
                NATStage(
                    dims[i], depths[i], num_heads[i], kernel_size, dilations[i], downsample,
                    mlp_ratio, layer_scale, dpr[i], proj_drop_rate, norm_layer,
                )
            )
            self.feature_info.append(dict(num_chs=dims[i], reduction=4 * 2**i, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self.norm = norm_layer(self.num_features)
        self.head = ClassifierHead(self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate, input_fmt="NHWC")
        self.apply(init_transformer_weights)
        self.to(device=device, dtype=dtype)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict:
        return dict(
            stem=r"^stem",
            blocks=r"^stages\.(\d+)" if coarse else [
                (r"^stages\.(\d+)\.downsample", (0,)),
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                (r"^norm", (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enable

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            check_image_batch(x, self.in_chans, type(self).__name__)
        return self.norm(self.stages(self.stem(x)))


class NATDenseBackbone(nn.Module):
    """Dense-prediction NAT/DiNAT/DiNAT_s backbone (the official mmseg/mmdet ``NAT``/``DiNAT``/``DiNAT_s``):
    the classification trunk without final norm and head, and a LayerNorm per output.

    ``forward`` returns a list of NCHW maps, one per ``out_indices`` entry (strides 4, 8, 16, 32).
    """

    def __init__(self, out_indices: Sequence[int] = (0, 1, 2, 3), **kwargs):
        super().__init__()
        self.trunk = NAT(num_classes=0, **kwargs)
        self.out_indices = self.trunk.prune_intermediate_layers(list(out_indices), prune_norm=True)
        self.out_norms = nn.ModuleList([LayerNorm(self.trunk.feature_info[i]["num_chs"]) for i in self.out_indices])
        self.feature_info = [self.trunk.feature_info[i] for i in self.out_indices]

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        feats = self.trunk.forward_intermediates(x, self.out_indices, output_fmt="NHWC", intermediates_only=True)
        return [norm(f).permute(0, 3, 1, 2) for norm, f in zip(self.out_norms, feats)]


class NATIsotropic(_NHWCClassifier):
    """Isotropic (ViT-like, no class token) NAT / DiNAT, or ViT-rpb when ``kernel_size`` is None.

    Patchify conv + LayerNorm, ``depth`` blocks on a ``H/p x W/p`` NHWC map (block ``i`` uses
    dilation 1 if ``i`` is even, else ``dilation``), LayerNorm, mean pool, head.
    ViT-rpb's global attention has a bias table tied to ``img_size // patch_size``.
    """

    trunk_attr = "blocks"
    norm_every_tap = True

    def __init__(
        self,
        img_size: Union[int, Tuple[int, int]] = 224,
        patch_size: int = 16,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        kernel_size: Optional[int] = 7,
        dilation: int = 1,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        norm_layer: Type[nn.Module] = LayerNorm,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ):
        super().__init__()
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.output_fmt = "NHWC"
        self.num_features = self.head_hidden_size = embed_dim
        self.grad_checkpointing = False
        self.stem = PatchStem(in_chans, embed_dim, patch_size, norm_layer)
        grid = tuple(s // patch_size for s in to_2tuple(img_size))
        if kernel_size is None and grid[0] != grid[1]:
            raise ValueError(f"ViT-rpb needs a square token grid, got img_size {img_size} with patch {patch_size}")
        dpr = drop_path_schedule(drop_path_rate, depth)
        blocks = []
        for i in range(depth):
            if kernel_size is None:
                attn = GlobalAttentionRPB(embed_dim, num_heads, grid[0], proj_drop=proj_drop_rate)
            else:
                attn = NeighborhoodAttention2d(
                    embed_dim, num_heads, kernel_size, dilation=1 if i % 2 == 0 else dilation, proj_drop=proj_drop_rate
                )
            blocks.append(NHWCTransformerBlock(embed_dim, attn, mlp_ratio, drop_path=dpr[i], proj_drop=proj_drop_rate,
                                               norm_layer=norm_layer, autocast_norm_output=True))
        self.blocks = nn.Sequential(*blocks)
        self.feature_info = [dict(num_chs=embed_dim, reduction=patch_size, module=f"blocks.{i}") for i in range(depth)]
        self.norm = norm_layer(embed_dim)
        self.head = ClassifierHead(embed_dim, num_classes, pool_type=global_pool, drop_rate=drop_rate, input_fmt="NHWC")
        self.apply(init_transformer_weights)
        self.to(device=device, dtype=dtype)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict:
        return dict(stem=r"^stem", blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            check_image_batch(x, self.in_chans, type(self).__name__)
        x = self.stem(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return self.norm(x)



# ---------------------------------------------------------------------------------------------
# Checkpoint conversion

_HIERARCHICAL_RULES = (
    (r"^patch_embed\.proj\.0\.", "stem.conv1."),
    (r"^patch_embed\.proj\.1\.", "stem.conv2."),
    (r"^patch_embed\.", "stem."),
    (r"^(?:levels|layers)\.(\d+)\.blocks\.(\d+)\.gamma1$", r"stages.\1.blocks.\2.ls1.gamma"),
    (r"^(?:levels|layers)\.(\d+)\.blocks\.(\d+)\.gamma2$", r"stages.\1.blocks.\2.ls2.gamma"),
    (r"^(?:levels|layers)\.(\d+)\.blocks\.", r"stages.\1.blocks."),
    (r"^head\.", "head.fc."),
    (r"^norm(\d+)\.", r"out_norms.\1."),
)
_ISOTROPIC_RULES = (
    (r"^patch_embed\.", "stem."),
    (r"^layers\.(\d+)\.", r"blocks.\1."),
    (r"^head\.", "head.fc."),
)


def _convert_hierarchical(state_dict: Dict[str, torch.Tensor], dense: bool) -> Dict[str, torch.Tensor]:
    out = {}
    for key, value in state_dict.items():
        m = re.match(r"^(?:levels|layers)\.(\d+)\.downsample\.(.*)$", key)
        if m:  # official downsamplers close level i; visattn's open stage i + 1
            key = f"stages.{int(m.group(1)) + 1}.downsample.{m.group(2)}"
        else:
            key = rename_key(key, _HIERARCHICAL_RULES)
        out[("trunk." + key if dense and not key.startswith("out_norms.") else key)] = value
    return out


def _convert_isotropic(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    out = {}
    for key, value in state_dict.items():
        if key.endswith(".attn.relative_position_index"):
            expected = relative_position_index(int(round(value.shape[0] ** 0.5)))
            if not torch.equal(value.cpu().long(), expected):
                raise CheckpointMismatchError(f"{key} differs from the ViT-rpb index this model computes")
            continue
        out[rename_key(key, _ISOTROPIC_RULES)] = value
    return out


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Map an official NAT-family state dict onto ``model`` (visattn state dicts pass unchanged).

    Raises :class:`CheckpointMismatchError` when the checkpoint belongs to another family.
    """
    state_dict = unwrap_checkpoint(state_dict)
    own_keys = model.state_dict()
    if any(k in own_keys for k in state_dict) and not any(k.startswith(("levels.", "layers.", "patch_embed.")) for k in state_dict):
        return state_dict
    family = guess_family(state_dict) or "unknown"
    if isinstance(model, NATIsotropic):
        if not family.startswith(("ViT-rpb", "NAT / DiNAT isotropic")):
            raise CheckpointMismatchError(f"expected an official isotropic NAT / ViT-rpb checkpoint, this one looks like: {family}")
        return _convert_isotropic(state_dict)
    if not family.startswith(("NAT / DiNAT (official", "DiNAT_s")):
        raise CheckpointMismatchError(f"expected an official NAT / DiNAT / DiNAT_s checkpoint, this one looks like: {family}")
    if isinstance(model.stem if isinstance(model, NAT) else model.trunk.stem, ConvStem) != family.startswith("NAT / DiNAT"):
        raise CheckpointMismatchError(f"checkpoint layout ({family}) does not match the model's stem type")
    return _convert_hierarchical(state_dict, dense=isinstance(model, NATDenseBackbone))


# ---------------------------------------------------------------------------------------------
# from_official builders (constructor kwargs of the official classes)

def _hierarchical_kwargs(kwargs: Dict, stem_type: str) -> Dict:
    return dict(
        depths=kwargs["depths"],
        num_heads=kwargs["num_heads"],
        embed_dim=kwargs["embed_dim"],
        mlp_ratio=kwargs.get("mlp_ratio", 4.0),
        kernel_size=kwargs.get("kernel_size", 7),
        dilations=kwargs.get("dilations"),
        layer_scale=kwargs.get("layer_scale"),
        stem_type=stem_type,
        drop_path_rate=kwargs.get("drop_path_rate", 0.0),
    )


@register_official("classification/nat.py::NAT", "classification/dinat.py::DiNAT", "classification/dinats.py::DiNAT_s")
def _official_classifier(meta: Dict) -> nn.Module:
    kwargs = meta["constructor_kwargs"]
    stem = "patch" if "dinats.py" in meta["official_class"] else "conv"
    return NAT(num_classes=kwargs.get("num_classes", 1000), **_hierarchical_kwargs(kwargs, stem))


@register_official(
    "segmentation/nat.py::NAT", "segmentation/dinat.py::DiNAT", "segmentation/dinats.py::DiNAT_s",
    "detection/nat.py::NAT", "detection/dinat.py::DiNAT", "detection/dinats.py::DiNAT_s",
)
def _official_dense(meta: Dict) -> nn.Module:
    kwargs = meta["constructor_kwargs"]
    stem = "patch" if "dinats.py" in meta["official_class"] else "conv"
    return NATDenseBackbone(out_indices=kwargs.get("out_indices", (0, 1, 2, 3)), **_hierarchical_kwargs(kwargs, stem))


@register_official("classification/isotropic.py::NATIsotropic")
def _official_isotropic(meta: Dict) -> nn.Module:
    kwargs = meta["constructor_kwargs"]
    global_attention = "VisionTransformerLayer" in str(kwargs.get("layer", ""))
    return NATIsotropic(
        img_size=kwargs.get("img_size", 224),
        patch_size=kwargs.get("patch_size", 16),
        embed_dim=kwargs["embed_dim"],
        depth=kwargs["depth"],
        num_heads=kwargs["num_heads"],
        mlp_ratio=kwargs.get("mlp_ratio", 4.0),
        kernel_size=None if global_attention else kwargs.get("kernel_size", 7),
        dilation=1 if global_attention else (kwargs.get("dilation") or 1),
        num_classes=kwargs.get("num_classes", 1000),
        drop_path_rate=kwargs.get("drop_path_rate", 0.0),
    )


# ---------------------------------------------------------------------------------------------
# timm registration

def _create_nat(variant: str, pretrained: bool = False, **kwargs) -> NAT:
    return build_model_with_cfg(
        NAT, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls="getter"),
        **kwargs,
    )


def _create_nat_isotropic(variant: str, pretrained: bool = False, **kwargs) -> NATIsotropic:
    return build_model_with_cfg(
        NATIsotropic, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=3, feature_cls="getter"),  # the last three blocks
        **kwargs,
    )


_NAT_URL = "https://shi-labs.com/projects/nat/checkpoints/CLS/"
_DINAT_URL = "https://shi-labs.com/projects/dinat/checkpoints/"


def _cfg(url: str = "", official: str = "", paper: str = "arXiv:2209.15001", **kwargs) -> Dict:
    cfg = dict(
        url=url,
        num_classes=1000,
        input_size=(3, 224, 224),
        pool_size=(7, 7),
        crop_pct=0.875,
        interpolation="bicubic",
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        first_conv="stem.conv1",
        classifier="head.fc",
        license="mit",
        paper_ids=paper,
        origin_url="https://github.com/SHI-Labs/Neighborhood-Attention-Transformer",
        notes=(f"official name: {official}",) if official else None,
    )
    cfg.update(kwargs)
    return cfg


_384 = dict(input_size=(3, 384, 384), pool_size=(12, 12), crop_pct=1.0)
_PATCH_STEM = dict(first_conv="stem.proj")
_ISO = dict(first_conv="stem.proj", pool_size=(14, 14))

default_cfgs = generate_default_cfgs({
    "visattn_nat_m.in1k": _cfg(_NAT_URL + "nat_mini.pth", "nat_mini", "arXiv:2204.07143"),
    "visattn_nat_t.in1k": _cfg(_NAT_URL + "nat_tiny.pth", "nat_tiny", "arXiv:2204.07143"),
    "visattn_nat_s.in1k": _cfg(_NAT_URL + "nat_small.pth", "nat_small", "arXiv:2204.07143"),
    "visattn_nat_b.in1k": _cfg(_NAT_URL + "nat_base.pth", "nat_base", "arXiv:2204.07143"),
    "visattn_dinat_m.in1k": _cfg(_DINAT_URL + "imagenet1k/dinat_mini_in1k_224.pth", "dinat_mini"),
    "visattn_dinat_t.in1k": _cfg(_DINAT_URL + "imagenet1k/dinat_tiny_in1k_224.pth", "dinat_tiny"),
    "visattn_dinat_s.in1k": _cfg(_DINAT_URL + "imagenet1k/dinat_small_in1k_224.pth", "dinat_small"),
    "visattn_dinat_b.in1k": _cfg(_DINAT_URL + "imagenet1k/dinat_base_in1k_224.pth", "dinat_base"),
    "visattn_dinat_l.in22k_ft_in1k": _cfg(_DINAT_URL + "imagenet1k/dinat_large_in22k_in1k_224.pth", "dinat_large"),
    "visattn_dinat_l.in22k": _cfg(_DINAT_URL + "imagenet22k/dinat_large_in22k_224.pth", "dinat_large_21k", num_classes=21841),
    "visattn_dinat_l_k11.in22k": _cfg(
        _DINAT_URL + "imagenet22k/dinat_large_in22k_224_11x11interp.pth", "dinat_large_21k_11x11", num_classes=21841
    ),
    "visattn_dinat_l_384.in22k_ft_in1k": _cfg(
        _DINAT_URL + "imagenet1k/dinat_large_in22k_in1k_384.pth", "dinat_large_384", **_384
    ),
    "visattn_dinat_l_384_k11.in22k_ft_in1k": _cfg(
        _DINAT_URL + "imagenet1k/dinat_large_in22k_in1k_384_11x11.pth", "dinat_large_384_11x11", **_384
    ),
    "visattn_dinats_t.in1k": _cfg(_DINAT_URL + "imagenet1k/dinat_s_tiny_in1k_224.pth", "dinat_s_tiny", **_PATCH_STEM),
    "visattn_dinats_s.in1k": _cfg(_DINAT_URL + "imagenet1k/dinat_s_small_in1k_224.pth", "dinat_s_small", **_PATCH_STEM),
    "visattn_dinats_b.in1k": _cfg(_DINAT_URL + "imagenet1k/dinat_s_base_in1k_224.pth", "dinat_s_base", **_PATCH_STEM),
    "visattn_dinats_l.in22k_ft_in1k": _cfg(_DINAT_URL + "imagenet1k/dinat_s_large_in1k_224.pth", "dinat_s_large", **_PATCH_STEM),
    "visattn_dinats_l.in22k": _cfg(
        _DINAT_URL + "imagenet22k/dinat_s_large_in22k_224.pth", "dinat_s_large_21k", num_classes=21841, **_PATCH_STEM
    ),
    "visattn_dinats_l_384.in22k_ft_in1k": _cfg(
        _DINAT_URL + "imagenet1k/dinat_s_large_in1k_384.pth", "dinat_s_large_384", **_PATCH_STEM, **_384
    ),
    "visattn_nat_iso_s.in1k": _cfg(_DINAT_URL + "isotropic/nat_isotropic_small_in1k_224.pth", "nat_isotropic_small", **_ISO),
    "visattn_nat_iso_b.in1k": _cfg(_DINAT_URL + "isotropic/nat_isotropic_base_in1k_224.pth", "nat_isotropic_base", **_ISO),
    "visattn_dinat_iso_s.in1k": _cfg(_DINAT_URL + "isotropic/dinat_isotropic_small_in1k_224.pth", "dinat_isotropic_small", **_ISO),
    "visattn_dinat_iso_b.in1k": _cfg(_DINAT_URL + "isotropic/dinat_isotropic_base_in1k_224.pth", "dinat_isotropic_base", **_ISO),
    "visattn_vitrpb_s.in1k": _cfg(
        _DINAT_URL + "isotropic/vitrpb_small_in1k_224.pth", "vitrpb_small", fixed_input_size=True, **_ISO
    ),
    "visattn_vitrpb_b.in1k": _cfg(
        _DINAT_URL + "isotropic/vitrpb_base_in1k_224.pth", "vitrpb_base", fixed_input_size=True, **_ISO
    ),
})

_SIZES = {
    "m": dict(depths=(3, 4, 6, 5), num_heads=(2, 4, 8, 16), embed_dim=64, mlp_ratio=3.0, drop_path_rate=0.2),
    "t": dict(depths=(3, 4, 18, 5), num_heads=(2, 4, 8, 16), embed_dim=64, mlp_ratio=3.0, drop_path_rate=0.2),
    "s": dict(depths=(3, 4, 18, 5), num_heads=(3, 6, 12, 24), embed_dim=96, mlp_ratio=2.0, drop_path_rate=0.3),
    "b": dict(depths=(3, 4, 18, 5), num_heads=(4, 8, 16, 32), embed_dim=128, mlp_ratio=2.0, drop_path_rate=0.5),
    "l": dict(depths=(3, 4, 18, 5), num_heads=(6, 12, 24, 48), embed_dim=192, mlp_ratio=2.0, drop_path_rate=0.35),
}
_DINATS_SIZES = {
    "t": dict(depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), embed_dim=96, drop_path_rate=0.2),
    "s": dict(depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), embed_dim=96, drop_path_rate=0.3),
    "b": dict(depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), embed_dim=128, drop_path_rate=0.5),
    "l": dict(depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), embed_dim=192, drop_path_rate=0.35),
}
_DIL_224 = (8, 4, 2, 1)
_DIL_384 = (13, 6, 3, 1)


def _nat(size: str, **overrides) -> Dict:
    return dict(_SIZES[size], **overrides)


def _dinat(size: str, stage_dilations=_DIL_224, **overrides) -> Dict:
    cfg = dict(_SIZES[size], **overrides)
    cfg["dilations"] = alternating_dilations(cfg["depths"], stage_dilations)
    return cfg


def _dinats(size: str, stage_dilations=_DIL_224) -> Dict:
    cfg = dict(_DINATS_SIZES[size], mlp_ratio=4.0, stem_type="patch")
    cfg["dilations"] = alternating_dilations(cfg["depths"], stage_dilations)
    return cfg


def _iso(embed_dim: int, num_heads: int, drop_path_rate: float, kernel_size: Optional[int], dilation: int = 1) -> Dict:
    return dict(embed_dim=embed_dim, depth=12, num_heads=num_heads, drop_path_rate=drop_path_rate,
                kernel_size=kernel_size, dilation=dilation)


@register_model
def visattn_nat_m(pretrained: bool = False, **kwargs) -> NAT:
    """NAT-Mini (official ``nat_mini``), 20.0M params."""
    return _create_nat("visattn_nat_m", pretrained, **dict(_nat("m"), **kwargs))


@register_model
def visattn_nat_t(pretrained: bool = False, **kwargs) -> NAT:
    """NAT-Tiny (official ``nat_tiny``), 27.9M params."""
    return _create_nat("visattn_nat_t", pretrained, **dict(_nat("t"), **kwargs))


@register_model
def visattn_nat_s(pretrained: bool = False, **kwargs) -> NAT:
    """NAT-Small (official ``nat_small``, layer scale 1e-5), 50.7M params."""
    return _create_nat("visattn_nat_s", pretrained, **dict(_nat("s", layer_scale=1e-5), **kwargs))


@register_model
def visattn_nat_b(pretrained: bool = False, **kwargs) -> NAT:
    """NAT-Base (official ``nat_base``, layer scale 1e-5), 89.8M params."""
    return _create_nat("visattn_nat_b", pretrained, **dict(_nat("b", layer_scale=1e-5), **kwargs))


@register_model
def visattn_dinat_m(pretrained: bool = False, **kwargs) -> NAT:
    """DiNAT-Mini (official ``dinat_mini``)."""
    return _create_nat("visattn_dinat_m", pretrained, **dict(_dinat("m"), **kwargs))


@register_model
def visattn_dinat_t(pretrained: bool = False, **kwargs) -> NAT:
    """DiNAT-Tiny (official ``dinat_tiny``)."""
    return _create_nat("visattn_dinat_t", pretrained, **dict(_dinat("t"), **kwargs))


@register_model
def visattn_dinat_s(pretrained: bool = False, **kwargs) -> NAT:
    """DiNAT-Small (official ``dinat_small``; no layer scale, unlike NAT-Small)."""
    return _create_nat("visattn_dinat_s", pretrained, **dict(_dinat("s"), **kwargs))


@register_model
def visattn_dinat_b(pretrained: bool = False, **kwargs) -> NAT:
    """DiNAT-Base (official ``dinat_base``, layer scale 1e-5)."""
    return _create_nat("visattn_dinat_b", pretrained, **dict(_dinat("b", layer_scale=1e-5), **kwargs))


@register_model
def visattn_dinat_l(pretrained: bool = False, **kwargs) -> NAT:
    """DiNAT-Large at 224 (official ``dinat_large``; ``.in22k`` is ``dinat_large_21k``)."""
    return _create_nat("visattn_dinat_l", pretrained, **dict(_dinat("l"), **kwargs))


@register_model
def visattn_dinat_l_k11(pretrained: bool = False, **kwargs) -> NAT:
    """DiNAT-Large with 11x11 kernels at 224 (official ``dinat_large_21k_11x11``)."""
    return _create_nat("visattn_dinat_l_k11", pretrained, **dict(_dinat("l", kernel_size=11), **kwargs))


@register_model
def visattn_dinat_l_384(pretrained: bool = False, **kwargs) -> NAT:
    """DiNAT-Large at 384 (official ``dinat_large_384``; dilations 13/6/3/1)."""
    return _create_nat("visattn_dinat_l_384", pretrained, **dict(_dinat("l", _DIL_384), **kwargs))


@register_model
def visattn_dinat_l_384_k11(pretrained: bool = False, **kwargs) -> NAT:
    """DiNAT-Large with 11x11 kernels at 384 (official ``dinat_large_384_11x11``; dilations 8/4/2/1)."""
    return _create_nat("visattn_dinat_l_384_k11", pretrained, **dict(_dinat("l", kernel_size=11), **kwargs))


@register_model
def visattn_dinats_t(pretrained: bool = False, **kwargs) -> NAT:
    """DiNAT_s-Tiny (official ``dinat_s_tiny``): Swin layout with (dilated) NA."""
    return _create_nat("visattn_dinats_t", pretrained, **dict(_dinats("t"), **kwargs))


@register_model
def visattn_dinats_s(pretrained: bool = False, **kwargs) -> NAT:
    """DiNAT_s-Small (official ``dinat_s_small``)."""
    return _create_nat("visattn_dinats_s", pretrained, **dict(_dinats("s"), **kwargs))


@register_model
def visattn_dinats_b(pretrained: bool = False, **kwargs) -> NAT:
    """DiNAT_s-Base (official ``dinat_s_base``)."""
    return _create_nat("visattn_dinats_b", pretrained, **dict(_dinats("b"), **kwargs))


@register_model
def visattn_dinats_l(pretrained: bool = False, **kwargs) -> NAT:
    """DiNAT_s-Large at 224 (official ``dinat_s_large``; ``.in22k`` is ``dinat_s_large_21k``)."""
    return _create_nat("visattn_dinats_l", pretrained, **dict(_dinats("l"), **kwargs))


@register_model
def visattn_dinats_l_384(pretrained: bool = False, **kwargs) -> NAT:
    """DiNAT_s-Large at 384 (official ``dinat_s_large_384``; dilations 13/6/3/1)."""
    return _create_nat("visattn_dinats_l_384", pretrained, **dict(_dinats("l", _DIL_384), **kwargs))


@register_model
def visattn_nat_iso_s(pretrained: bool = False, **kwargs) -> NATIsotropic:
    """Isotropic NAT-Small (official ``nat_isotropic_small``)."""
    return _create_nat_isotropic("visattn_nat_iso_s", pretrained, **dict(_iso(384, 12, 0.1, 7), **kwargs))


@register_model
def visattn_nat_iso_b(pretrained: bool = False, **kwargs) -> NATIsotropic:
    """Isotropic NAT-Base (official ``nat_isotropic_base``; 24 heads of 32)."""
    return _create_nat_isotropic("visattn_nat_iso_b", pretrained, **dict(_iso(768, 24, 0.4, 7), **kwargs))


@register_model
def visattn_dinat_iso_s(pretrained: bool = False, **kwargs) -> NATIsotropic:
    """Isotropic DiNAT-Small (official ``dinat_isotropic_small``; odd blocks dilation 2)."""
    return _create_nat_isotropic("visattn_dinat_iso_s", pretrained, **dict(_iso(384, 12, 0.1, 7, 2), **kwargs))


@register_model
def visattn_dinat_iso_b(pretrained: bool = False, **kwargs) -> NATIsotropic:
    """Isotropic DiNAT-Base (official ``dinat_isotropic_base``)."""
    return _create_nat_isotropic("visattn_dinat_iso_b", pretrained, **dict(_iso(768, 24, 0.4, 7, 2), **kwargs))


@register_model
def visattn_vitrpb_s(pretrained: bool = False, **kwargs) -> NATIsotropic:
    """ViT-rpb-Small (official ``vitrpb_small``): global attention + relative position bias, 224 only."""
    return _create_nat_isotropic("visattn_vitrpb_s", pretrained, **dict(_iso(384, 12, 0.1, None), **kwargs))


@register_model
def visattn_vitrpb_b(pretrained: bool = False, **kwargs) -> NATIsotropic:
    """ViT-rpb-Base (official ``vitrpb_base``), 224 only."""
    return _create_nat_isotropic("visattn_vitrpb_b", pretrained, **dict(_iso(768, 24, 0.4, None), **kwargs))
