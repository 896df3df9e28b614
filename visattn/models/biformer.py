"""BiFormer: vision transformer with bi-level routing attention (Zhu et al., CVPR 2023).

Four NCHW stages at strides 4, 8, 16, 32 (BatchNorm conv stem and conv downsamplers). Each block
adds a depthwise 3x3 conv position embedding, then runs a pre-norm transformer block (LayerNorm
eps 1e-6) in NHWC: bi-level routing attention in stages 1-3, global attention with LePE (8 heads)
in stage 4. The classifier ends with BatchNorm, average pooling and a linear head.

Official checkpoints (``{'model': state_dict}``) and the mmseg/mmdet ``BiFormer_mm`` backbones load
through :func:`checkpoint_filter_fn` / ``visattn.from_official``.
"""
from functools import partial
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import ClassifierHead, LayerNorm2d, get_device_dtype, to_2tuple
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch.fx._symbolic_trace import is_fx_symbolic_tracing

from visattn.convert import CheckpointMismatchError, guess_family, register_official, remap_keys, unwrap_checkpoint
from visattn.layers import AttentionLePE, BiLevelRoutingAttention, LayerNorm, NHWCTransformerBlock
from visattn.models._common import check_image_batch, drop_path_schedule, init_transformer_weights, trunk_intermediates

__all__ = ["BiFormer", "BiFormerDenseBackbone"]


class BiFormerBlock(NHWCTransformerBlock):
    """Depthwise-conv position embedding, then a pre-norm transformer block; NCHW in and out."""

    def __init__(self, dim: int, attn: nn.Module, mlp_ratio: float, drop_path: float):
        # The norms feed only qkv / fc1 and (stage 4) LePE's conv: autocast casts all to bf16 anyway.
        super().__init__(dim, attn, mlp_ratio, drop_path=drop_path, norm_layer=partial(LayerNorm, eps=1e-6),
                         autocast_norm_output=True, conv_pos_embed=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Channels-last memory (a no-op after the first block of a stage) makes the NHWC view of
        # the map dense, so the position conv (fused with its residual add), the transformer
        # block's ops and its residual adds run on contiguous tensors; the output stays channels-last.
        x = x.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)
        x = self.residual_branches(x) if torch.jit.is_scripting() else self._forward_eager(x)
        return x.permute(0, 3, 1, 2)


class BiFormerStage(nn.Module):
    """Optional stride-2 conv + BatchNorm downsampler, then the blocks (NCHW)."""

    def __init__(self, in_dim: int, dim: int, depth: int, downsample: bool, attn_factory, mlp_ratio: float,
                 drop_path: Sequence[float]):
        super().__init__()
        self.downsample = (nn.Sequential(nn.Conv2d(in_dim, dim, 3, stride=2, padding=1), nn.BatchNorm2d(dim))
                           if downsample else nn.Identity())
        self.blocks = nn.Sequential(*[BiFormerBlock(dim, attn_factory(), mlp_ratio, drop_path[i]) for i in range(depth)])
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


def _trunk(in_chans: int, depths: Sequence[int], embed_dims: Sequence[int], qk_dims: Sequence[int], head_dim: int,
           n_win: int, topks: Sequence[int], mlp_ratios: Sequence[float], side_dwconv: int, drop_path_rate: float,
           auto_pad: bool) -> Tuple[nn.Module, nn.Sequential]:
    """The stem and the four stages shared by the classifier and the dense backbone."""
    stem = nn.Sequential(
        nn.Conv2d(in_chans, embed_dims[0] // 2, 3, stride=2, padding=1), nn.BatchNorm2d(embed_dims[0] // 2), nn.GELU(),
        nn.Conv2d(embed_dims[0] // 2, embed_dims[0], 3, stride=2, padding=1), nn.BatchNorm2d(embed_dims[0]),
    )
    rates = drop_path_schedule(drop_path_rate, sum(depths))
    stages = []
    for i, (depth, dim, qk_dim, topk) in enumerate(zip(depths, embed_dims, qk_dims, topks)):
        if topk > n_win ** 2:
            raise ValueError(f"topks[{i}] = {topk} routes to more key regions than stage {i + 1}'s n_win x n_win = "
                             f"{n_win ** 2}; expected 1 to {n_win ** 2} (or -2 for global attention)")
        if topk > 0:
            attn_factory = partial(BiLevelRoutingAttention, dim, qk_dim // head_dim, n_win, qk_dim, topk,
                                   side_dwconv, auto_pad)
        elif topk == -2:  # the released models' last stage: global attention, 8 heads, LePE on its input
            attn_factory = partial(AttentionLePE, dim, 8, False, side_dwconv)
        else:
            raise ValueError(f"topk must be > 0 (routing) or -2 (global attention with LePE), got {topk} for stage {i}")
        start = sum(depths[:i])
        stages.append(BiFormerStage(embed_dims[i - 1] if i else dim, dim, depth, i > 0, attn_factory, mlp_ratios[i],
                                    rates[start:start + depth]))
    return stem, nn.Sequential(*stages)



@torch.jit.ignore
def check_biformer_input(x: torch.Tensor, in_chans: int, n_win: int, topks: List[int], auto_pad: bool,
                         model_name: str) -> None:
    """Raise a ValueError, naming the input size and what is accepted, unless ``x`` is an image
    batch (:func:`check_image_batch`) whose every routed stage's map (``ceil(H / (4 * 2**i))`` at
    stage ``i``) can be cut into ``n_win x n_win`` regions: divisible by ``n_win`` without
    ``auto_pad``, at least ``n_win`` per side (a pixel per region) with it. Skipped while torch.fx
    traces the model (shapes are symbolic then)."""
    check_image_batch(x, in_chans, model_name)
    if is_fx_symbolic_tracing():
        return
    H, W = x.shape[-2:]
    routed = [i for i, topk in enumerate(topks) if topk > 0]
    last_stride = 4 * 2 ** routed[-1] if routed else 0
    for i in routed:
        stride = 4 * 2 ** i
        h, w = -(-H // stride), -(-W // stride)  # the stem's and downsamplers' stride-2 convs round up
        where = f"{model_name}: a {H}x{W} input gives a {h}x{w} map at stage {i + 1} (stride {stride})"
        if not auto_pad and (h % n_win or w % n_win):
            raise ValueError(f"{where}, which n_win={n_win} does not divide; expected an input whose stage 1-"
                             f"{routed[-1] + 1} maps n_win divides, e.g. a multiple of {last_stride * n_win} per "
                             f"side (or auto_pad=True)")
        if h < n_win or w < n_win:
            smallest = (n_win - 1) * last_stride + 1
            raise ValueError(f"{where}, smaller than its {n_win}x{n_win} routing regions (a pixel each); "
                             f"expected an input of at least {smallest} pixels per side")


class BiFormer(nn.Module):
    """BiFormer classifier. ``forward_features`` returns NCHW ``[B, C4, H/32, W/32]`` (after BatchNorm).

    ``img_size`` is only checked (the model runs at any size whose stage maps ``n_win`` divides).
    """

    def __init__(
        self,
        depths: Sequence[int] = (2, 2, 8, 2),
        embed_dims: Sequence[int] = (64, 128, 256, 512),
        qk_dims: Optional[Sequence[int]] = None,
        head_dim: int = 32,
        n_win: int = 7,
        topks: Sequence[int] = (1, 4, 16, -2),
        mlp_ratios: Sequence[float] = (3, 3, 3, 3),
        side_dwconv: int = 5,
        auto_pad: bool = False,
        img_size: Union[int, Tuple[int, int]] = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ):
        super().__init__()
        # Without auto_pad the routing regions must tile every stage-1..3 map (strides 4..16).
        sizes = to_2tuple(img_size)
        if not auto_pad and any(s % (16 * n_win) for s in sizes):
            raise ValueError(f"img_size {sizes} must be a multiple of 16 * n_win = {16 * n_win} (or set auto_pad=True)")
        self.num_classes, self.in_chans = num_classes, in_chans
        self.n_win, self.topks, self.auto_pad = n_win, list(topks), auto_pad
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.stem, self.stages = _trunk(in_chans, depths, embed_dims, qk_dims or embed_dims, head_dim, n_win, topks,
                                        mlp_ratios, side_dwconv, drop_path_rate, auto_pad)
        self.feature_info = [dict(num_chs=c, reduction=4 * 2 ** i, module=f"stages.{i}") for i, c in enumerate(embed_dims)]
        self.norm = nn.BatchNorm2d(embed_dims[-1])
        self.head = ClassifierHead(embed_dims[-1], num_classes, pool_type=global_pool, drop_rate=drop_rate)
        self.apply(init_transformer_weights)
        self.to(device=device, dtype=dtype)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict:
        return dict(stem=r"^stem", blocks=r"^stages\.(\d+)" if coarse else [
            (r"^stages\.(\d+)\.downsample", (0,)), (r"^stages\.(\d+)\.blocks\.(\d+)", None), (r"^norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return set()

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
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
        """Stage outputs as NCHW maps (the last one normed when ``norm``), plus the final
        ``forward_features`` output unless ``intermediates_only``."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        check_biformer_input(x, self.in_chans, self.n_win, self.topks, self.auto_pad, "BiFormer")
        last = len(self.stages) - 1
        x, intermediates, reached_end = trunk_intermediates(
            x, self.stem, self.stages, indices, stop_early,
            lambda i, feat: self.norm(feat) if norm and i == last else feat)
        if intermediates_only:
            return intermediates
        if reached_end:
            x = self.norm(x)
        return x, intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[: max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        check_biformer_input(x, self.in_chans, self.n_win, self.topks, self.auto_pad, "BiFormer")
        return self.norm(self.stages(self.stem(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=True) if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class BiFormerDenseBackbone(nn.Module):
    """The official mmseg/mmdet ``BiFormer_mm``: the trunk (``auto_pad`` on by default, any input
    size) with a LayerNorm2d (eps 1e-6) on each stage output. Returns four NCHW maps, strides 4..32."""

    def __init__(self, depths: Sequence[int] = (4, 4, 18, 4), embed_dims: Sequence[int] = (64, 128, 256, 512),
                 qk_dims: Optional[Sequence[int]] = None, head_dim: int = 32, n_win: int = 8,
                 topks: Sequence[int] = (1, 4, 16, -2), mlp_ratios: Sequence[float] = (3, 3, 3, 3),
                 side_dwconv: int = 5, auto_pad: bool = True, in_chans: int = 3, drop_path_rate: float = 0.0):
        super().__init__()
        self.in_chans = in_chans
        self.n_win, self.topks, self.auto_pad = n_win, list(topks), auto_pad
        self.stem, self.stages = _trunk(in_chans, depths, embed_dims, qk_dims or embed_dims, head_dim, n_win, topks,
                                        mlp_ratios, side_dwconv, drop_path_rate, auto_pad)
        self.extra_norms = nn.ModuleList([LayerNorm2d(c, eps=1e-6) for c in embed_dims])
        self.apply(init_transformer_weights)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        check_biformer_input(x, self.in_chans, self.n_win, self.topks, self.auto_pad, "BiFormerDenseBackbone")
        x = self.stem(x)
        outs = []
        for stage, norm in zip(self.stages, self.extra_norms):
            x = stage(x)
            outs.append(norm(x))
        return outs


# ---------------------------------------------------------------------------------------------
# Checkpoint conversion

_RULES = (
    (r"^downsample_layers\.0\.", "stem."),
    (r"^downsample_layers\.(\d+)\.", r"stages.\1.downsample."),
    (r"^stages\.(\d+)\.(\d+)\.attn\.qkv\.qkv\.", r"stages.\1.blocks.\2.attn.qkv."),  # BRA's QKVLinear wrapper
    (r"^stages\.(\d+)\.(\d+)\.mlp\.0\.", r"stages.\1.blocks.\2.mlp.fc1."),
    (r"^stages\.(\d+)\.(\d+)\.mlp\.3\.", r"stages.\1.blocks.\2.mlp.fc2."),
    (r"^stages\.(\d+)\.(\d+)\.", r"stages.\1.blocks.\2."),
    (r"^head\.", "head.fc."),
)


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Map an official BiFormer / BiFormer_mm state dict onto ``model`` (visattn state dicts pass unchanged).

    Raises :class:`CheckpointMismatchError` when the checkpoint belongs to another family.
    """
    state_dict = unwrap_checkpoint(state_dict)
    if not any(k.startswith("downsample_layers.") for k in state_dict):
        own = model.state_dict()
        if any(k in own for k in state_dict):
            return state_dict
        raise CheckpointMismatchError(
            f"expected an official BiFormer checkpoint, this one looks like: {guess_family(state_dict) or 'unknown'}")
    return remap_keys(state_dict, _RULES)


def _official_kwargs(kwargs: Dict) -> Dict:
    unsupported = {k: kwargs[k] for k in ("param_routing", "diff_routing", "soft_routing") if kwargs.get(k)}
    if kwargs.get("kv_downsample_mode", "identity") != "identity" or kwargs.get("layer_scale_init_value", -1) > 0 \
            or not kwargs.get("pre_norm", True) or kwargs.get("before_attn_dwconv", 3) != 3 or unsupported:
        raise ValueError("visattn builds the released BiFormer configuration (identity kv, no layer scale, pre-norm, "
                         f"3x3 position conv, parameter-free hard routing); got {kwargs}")
    return dict(depths=kwargs["depth"], embed_dims=kwargs["embed_dim"], qk_dims=kwargs.get("qk_dims"),
                head_dim=kwargs.get("head_dim", 32), n_win=kwargs.get("n_win", 7), topks=kwargs["topks"],
                mlp_ratios=kwargs.get("mlp_ratios", (4, 4, 4, 4)), side_dwconv=kwargs.get("side_dwconv", 5),
                drop_path_rate=kwargs.get("drop_path_rate", 0.0))


@register_official("models/biformer.py::BiFormer")
def _official_classifier(meta: Dict) -> nn.Module:
    kwargs = meta["constructor_kwargs"]
    return BiFormer(num_classes=kwargs.get("num_classes", 1000), auto_pad=kwargs.get("auto_pad", False),
                    **_official_kwargs(kwargs))


@register_official("semantic_segmentation/models_mm/biformer_mm.py::BiFormer_mm",
                   "object_detection/models_mm/biformer_mm.py::BiFormer_mm")
def _official_dense(meta: Dict) -> nn.Module:
    kwargs = meta["constructor_kwargs"]
    return BiFormerDenseBackbone(auto_pad=kwargs.get("auto_pad", True), **_official_kwargs(kwargs))


# ---------------------------------------------------------------------------------------------
# timm registration

def _create_biformer(variant: str, pretrained: bool = False, **kwargs) -> BiFormer:
    return build_model_with_cfg(
        BiFormer, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls="getter"),
        **kwargs,
    )


def _cfg(url: str, official: str, **kwargs) -> Dict:
    cfg = dict(
        url=url,
        num_classes=1000,
        input_size=(3, 224, 224),
        pool_size=(7, 7),
        crop_pct=0.875,
        interpolation="bicubic",
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        first_conv="stem.0",
        classifier="head.fc",
        license="mit",
        paper_ids="arXiv:2303.08810",
        origin_url="https://github.com/rayleizhu/BiFormer",
        # Routing regions need every stage-1..3 map divisible by n_win (7): sides that are multiples of 112.
        fixed_input_size=True,
        notes=(f"official name: {official}", "released .pth nests the weights under 'model'"),
    )
    cfg.update(kwargs)
    return cfg


_ONEDRIVE = "https://api.onedrive.com/v1.0/shares/s!{}/root/content"

default_cfgs = generate_default_cfgs({
    "visattn_biformer_t.in1k": _cfg(_ONEDRIVE.format("AkBbczdRlZvChHEOoGkgwgQzEDlM"), "biformer_tiny"),
    "visattn_biformer_s.in1k": _cfg(_ONEDRIVE.format("AkBbczdRlZvChHDyM-x9KWRBZ832"), "biformer_small"),
    "visattn_biformer_b.in1k": _cfg(_ONEDRIVE.format("AkBbczdRlZvChHI_XPhoadjaNxtO"), "biformer_base"),
})


@register_model
def visattn_biformer_t(pretrained: bool = False, **kwargs) -> BiFormer:
    args = dict(depths=(2, 2, 8, 2), embed_dims=(64, 128, 256, 512))
    return _create_biformer("visattn_biformer_t", pretrained, **dict(args, **kwargs))


@register_model
def visattn_biformer_s(pretrained: bool = False, **kwargs) -> BiFormer:
    args = dict(depths=(4, 4, 18, 4), embed_dims=(64, 128, 256, 512), drop_path_rate=0.15)
    return _create_biformer("visattn_biformer_s", pretrained, **dict(args, **kwargs))


@register_model
def visattn_biformer_b(pretrained: bool = False, **kwargs) -> BiFormer:
    args = dict(depths=(4, 4, 18, 4), embed_dims=(96, 192, 384, 768))
    return _create_biformer("visattn_biformer_b", pretrained, **dict(args, **kwargs))
