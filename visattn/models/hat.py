"""HAT: Hybrid Attention Transformer for image super-resolution.

Paper: "Activating More Pixels in Image Super-Resolution Transformer" (Chen et al., CVPR 2023,
arXiv:2205.04437). Official code: https://github.com/XPixelGroup/HAT (Apache-2.0).

``conv_first`` -> LayerNorm -> residual hybrid attention groups (RHAG: hybrid attention blocks,
i.e. (shifted-)window attention plus a scaled channel-attention conv branch, then an overlapping
cross-attention block and a 3x3 conv, with a residual) -> LayerNorm -> ``conv_after_body`` +
shallow features -> conv + LeakyReLU -> PixelShuffle upsampler -> ``conv_last``. The trunk runs
channels-last (NHWC). Input: RGB in [0, 1] of any size; it is reflect-padded to multiples of the
window (as the official test code does) and the output is cropped to ``upscale`` x the input.

Official BasicSR checkpoints (``{'params_ema': sd}`` / ``{'params': sd}``) load through
:func:`checkpoint_filter_fn` / ``visattn.from_official``. Key mapping:

* ``patch_embed.norm`` -> ``embed_norm``; ``layers.i.residual_group.blocks.j`` -> ``groups.i.blocks.j``;
  ``layers.i.residual_group.overlap_attn.{qkv,proj}`` -> ``groups.i.overlap_attn.attn.{qkv,proj}``
  (its norms and MLP keep their names); ``layers.i.conv`` -> ``groups.i.conv``;
* ``conv_block.cab.{0,2}`` -> ``conv_block.{0,2}``; ``conv_block.cab.3.attention.{1,3}`` ->
  ``conv_block.3.{fc1,fc2}``;
* ``relative_position_bias_table`` ``[(w+o-1)**2, heads]`` -> ``rpb [heads, w+o-1, w+o-1]``: the
  official table is read through its index buffer (query - key for self-attention, a key - query
  index that wraps around negative for OCAB) and stored by (key - query) offset, the layout
  ``visattn.kernels.na2d`` uses;
* the persistent buffers ``relative_position_index_SA`` / ``_OCA`` are compared with the index this
  model's window sizes give (a mismatch raises) and dropped: they are fully determined by the
  window sizes, so visattn stores none, and a checkpoint without them (the golden data) loads too.
"""
import functools
import re
from typing import Dict, Optional, Sequence

import torch
import torch.nn as nn
from timm.layers import DropPath, Mlp, to_2tuple
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model

from visattn.convert import (CheckpointMismatchError, check_state_dict, guess_family, register_official,
                             unwrap_checkpoint)
from visattn.layers.blocks import NHWCTransformerBlock
from visattn.layers.norm import LayerNorm
from visattn.layers.sr import ChannelAttentionConvBlock, PixelShuffleUpsampler
from visattn.layers.window_attention import OverlappingWindowAttention, WindowAttention
from visattn.models._common import drop_path_schedule, init_transformer_weights
from visattn.models._sr_common import SRModel, check_sr_input, pad_to_multiple, sr_cfg

__all__ = ["HAT"]

_RGB_MEAN = (0.4488, 0.4371, 0.4040)  # DIV2K mean, subtracted inside the model (official value)
_NUM_FEAT = 64  # channels of the reconstruction convs, hard-coded in the official code


class HybridAttentionBlock(nn.Module):
    """HAT's HAB on ``[B, H, W, C]``:

    ``y = norm1(x)``; ``x = x + drop_path(attn(y)) + conv_scale * CAB(y)``;
    ``x = x + drop_path(mlp(norm2(x)))``, where ``attn`` is (shifted-)window attention and CAB is
    conv3x3 ``C -> C/compress_ratio``, GELU, conv3x3 back to ``C``, channel attention.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int, shift_size: int, compress_ratio: int,
                 squeeze_factor: int, conv_scale: float, mlp_ratio: float, qkv_bias: bool, drop_path: float):
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window_size, shift_size, qkv_bias)
        hidden = dim // compress_ratio
        self.conv_block = ChannelAttentionConvBlock(dim, hidden, squeeze_factor)
        self.conv_scale = conv_scale
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        conv = self.conv_block(y.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        # add_ with alpha: one fused kernel for the scaled branch (the sum is a fresh tensor).
        x = (x + self.drop_path(self.attn(y))).add_(conv, alpha=self.conv_scale)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ResidualHybridAttentionGroup(nn.Module):
    """RHAG on ``[B, H, W, C]``: HABs (shift 0 on even blocks, ``window // 2`` on odd ones), the
    overlapping cross-attention block (OCAB: pre-norm attention and MLP, no drop path), a 3x3 conv,
    plus the group's input."""

    def __init__(self, dim: int, depth: int, num_heads: int, window_size: int, compress_ratio: int,
                 squeeze_factor: int, conv_scale: float, overlap_ratio: float, mlp_ratio: float, qkv_bias: bool,
                 drop_path: Sequence[float]):
        super().__init__()
        self.blocks = nn.Sequential(*[
            HybridAttentionBlock(dim, num_heads, window_size, 0 if i % 2 == 0 else window_size // 2, compress_ratio,
                                 squeeze_factor, conv_scale, mlp_ratio, qkv_bias, drop_path[i])
            for i in range(depth)
        ])
        self.overlap_attn = NHWCTransformerBlock(
            dim, OverlappingWindowAttention(dim, num_heads, window_size, overlap_ratio, qkv_bias), mlp_ratio,
            autocast_norm_output=True)
        self.conv = nn.Conv2d(dim, dim, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.overlap_attn(self.blocks(x))
        return self.conv(y.permute(0, 3, 1, 2)).permute(0, 2, 3, 1) + x


class HAT(SRModel):
    """HAT super-resolution model (pixel-shuffle upsampler, '1conv' residual connections).

    ``forward``: RGB ``[B, in_chans, H, W]`` in [0, 1], any H, W -> ``[B, in_chans, upscale*H, upscale*W]``
    (not clamped). The defaults are the released HAT (SRx4) configuration.
    """

    def __init__(
        self,
        upscale: int = 4,
        in_chans: int = 3,
        embed_dim: int = 180,
        depths: Sequence[int] = (6, 6, 6, 6, 6, 6),
        num_heads: Sequence[int] = (6, 6, 6, 6, 6, 6),
        window_size: int = 16,
        compress_ratio: int = 3,
        squeeze_factor: int = 30,
        conv_scale: float = 0.01,
        overlap_ratio: float = 0.5,
        mlp_ratio: float = 2.0,
        qkv_bias: bool = True,
        img_range: float = 1.0,
        drop_path_rate: float = 0.1,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ):
        super().__init__()
        if len(depths) != len(num_heads):
            raise ValueError(f"depths {tuple(depths)} and num_heads {tuple(num_heads)} must have the same length")
        self.upscale = upscale
        self.in_chans = in_chans
        self.window_size = window_size
        self.img_range = img_range
        self.num_features = embed_dim
        # The official `mean` is a plain tensor attribute: a non-persistent buffer follows .to()
        # and, like the original, stays out of the state dict.
        mean = torch.tensor(_RGB_MEAN).view(1, 3, 1, 1) if in_chans == 3 else torch.zeros(1, 1, 1, 1)
        self.register_buffer("mean", mean, persistent=False)

        self.conv_first = nn.Conv2d(in_chans, embed_dim, 3, padding=1)
        self.embed_norm = LayerNorm(embed_dim)
        rates = drop_path_schedule(drop_path_rate, sum(depths))
        self.groups = nn.Sequential(*[
            ResidualHybridAttentionGroup(embed_dim, depth, heads, window_size, compress_ratio, squeeze_factor,
                                         conv_scale, overlap_ratio, mlp_ratio, qkv_bias,
                                         rates[sum(depths[:i]):sum(depths[:i + 1])])
            for i, (depth, heads) in enumerate(zip(depths, num_heads))
        ])
        self.overlap_size = self.groups[0].overlap_attn.attn.overlap_size
        self.norm = LayerNorm(embed_dim)
        self.conv_after_body = nn.Conv2d(embed_dim, embed_dim, 3, padding=1)
        self.conv_before_upsample = nn.Sequential(nn.Conv2d(embed_dim, _NUM_FEAT, 3, padding=1),
                                                  nn.LeakyReLU(inplace=True))
        self.upsample = PixelShuffleUpsampler(upscale, _NUM_FEAT)
        self.conv_last = nn.Conv2d(_NUM_FEAT, in_chans, 3, padding=1)
        self.apply(init_transformer_weights)
        self.to(device=device, dtype=dtype)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict:
        return dict(stem=r"^conv_first|^embed_norm", blocks=r"^groups\.(\d+)" if coarse else [
            (r"^groups\.(\d+)\.blocks\.(\d+)", None), (r"^groups\.(\d+)\.(?:overlap_attn|conv)", (99998,)),
            (r"^norm|^conv_after_body|^conv_before_upsample|^upsample|^conv_last", (99999,))])

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Deep feature extraction (the official ``forward_features``): shallow features
        ``[B, embed_dim, H, W]`` (H, W multiples of ``window_size``) -> ``[B, embed_dim, H, W]``."""
        x = self.embed_norm(x.permute(0, 2, 3, 1))
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.groups, x)
        else:
            x = self.groups(x)
        return self.norm(x).permute(0, 3, 1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, in_chans, H, W]`` in [0, 1] -> ``[B, in_chans, upscale*H, upscale*W]``."""
        check_sr_input(x, self.in_chans, "HAT")
        H, W = x.shape[-2:]
        x = pad_to_multiple(x, self.window_size)  # the official test-time padding (hat_model.py)
        x = (x - self.mean) * self.img_range
        x = self.conv_first(x)
        x = self.conv_after_body(self.forward_features(x)) + x
        x = self.conv_last(self.upsample(self.conv_before_upsample(x)))
        x = x / self.img_range + self.mean
        return x[..., : H * self.upscale, : W * self.upscale]


# ---------------------------------------------------------------------------------------------
# Checkpoint conversion

def _window_coords(size: int) -> torch.Tensor:
    """Row-major ``(y, x)`` of a ``size x size`` window: ``[size*size, 2]``."""
    # Always on the CPU, whatever the default device: the results are cached (`official_table_rows`).
    coords = torch.arange(size, device="cpu")
    return torch.stack(torch.meshgrid(coords, coords, indexing="ij"), -1).view(-1, 2)


def official_relative_position_index(window_size: int, key_window: int) -> torch.Tensor:
    """HAT's ``relative_position_index_SA`` (``key_window == window_size``) or ``_OCA`` buffer.

    Returns int64 ``[window_size**2, key_window**2]``, the row of the official
    ``relative_position_bias_table`` that each (query, key) pair reads. Self-attention indexes by
    (query - key); OCAB by (key - query) + ``window_size - key_window + 1``, which is negative for
    some pairs: the official lookup wraps those around the table, and so does the converter.
    """
    rel = _window_coords(key_window)[None] - _window_coords(window_size)[:, None]  # key - query
    rel = window_size - 1 - rel if key_window == window_size else rel + (window_size - key_window + 1)
    return rel[..., 0] * (window_size + key_window - 1) + rel[..., 1]


@functools.lru_cache(maxsize=None)
def official_table_rows(window_size: int, key_window: int) -> torch.Tensor:
    """For each (key - query) offset, in ``rpb``'s row-major order, the official table row that
    reads it: int64 ``[(w+o-1)**2]`` (read-only, cached per window pair)."""
    size = window_size + key_window - 1
    rel = _window_coords(key_window)[None] - _window_coords(window_size)[:, None] + (window_size - 1)
    position = (rel[..., 0] * size + rel[..., 1]).view(-1)
    rows = torch.empty(size * size, dtype=torch.long, device="cpu")
    # Every offset occurs for some (query, key) pair, and all pairs of one offset read the same row;
    # `% size**2` is the wrap-around the official lookup does for OCAB's negative entries.
    rows[position] = official_relative_position_index(window_size, key_window).view(-1) % (size * size)
    return rows


def _table_to_rpb(key: str, table: torch.Tensor, window_size: int, key_window: int) -> torch.Tensor:
    """Official ``[(w+o-1)**2, heads]`` table -> ``rpb [heads, w+o-1, w+o-1]`` by (key - query) offset."""
    size = window_size + key_window - 1
    if table.dim() != 2 or table.shape[0] != size * size:
        raise CheckpointMismatchError(
            f"{key} has shape {tuple(table.shape)}, the model's windows ({window_size}, {key_window}) need "
            f"({size * size}, heads)")
    return table[official_table_rows(window_size, key_window).to(table.device)].t().reshape(-1, size, size)


def _check_index(key: str, value: torch.Tensor, window_size: int, key_window: int) -> None:
    expected = official_relative_position_index(window_size, key_window)
    if tuple(value.shape) != tuple(expected.shape) or not torch.equal(value.cpu().long(), expected):
        raise CheckpointMismatchError(
            f"{key} (shape {tuple(value.shape)}) differs from the index of this model's windows "
            f"({window_size}, {key_window}): shape {tuple(expected.shape)}")


def _rename(key: str) -> str:
    key = re.sub(r"^layers\.(\d+)\.(residual_group\.)?", r"groups.\1.", key)
    key = re.sub(r"^patch_embed\.norm\.", "embed_norm.", key)
    key = re.sub(r"\.conv_block\.cab\.3\.attention\.1\.", ".conv_block.3.fc1.", key)
    key = re.sub(r"\.conv_block\.cab\.3\.attention\.3\.", ".conv_block.3.fc2.", key)
    key = key.replace(".conv_block.cab.", ".conv_block.")
    key = re.sub(r"\.overlap_attn\.(qkv|proj|relative_position_bias_table)", r".overlap_attn.attn.\1", key)
    return key.replace("relative_position_bias_table", "rpb")


def _convert_official(state_dict: Dict[str, torch.Tensor], model: HAT) -> Dict[str, torch.Tensor]:
    ws, overlap = model.window_size, model.overlap_size
    out = {}
    for key, value in state_dict.items():
        if key == "relative_position_index_SA":
            _check_index(key, value, ws, ws)
            continue
        if key == "relative_position_index_OCA":
            _check_index(key, value, ws, overlap)
            continue
        new_key = _rename(key)
        if key.endswith("relative_position_bias_table"):
            value = _table_to_rpb(key, value, ws, overlap if ".overlap_attn." in key else ws)
        out[new_key] = value
    return out


def _checkpoint_scale(state_dict: Dict[str, torch.Tensor]) -> int:
    """Scale of the pixel-shuffle upsampler in a (converted) HAT state dict; 0 if it has none."""
    convs = sorted(k for k in state_dict if re.fullmatch(r"upsample\.\d+\.weight", k))
    if not convs:
        return 0
    first = state_dict[convs[0]]
    return 3 if first.shape[0] == 9 * first.shape[1] else 2 ** len(convs)


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: HAT) -> Dict[str, torch.Tensor]:
    """Map an official HAT state dict (flat or BasicSR-wrapped) onto ``model``; visattn state dicts
    pass unchanged.

    Raises :class:`CheckpointMismatchError` for another family, another upscale factor, or any
    missing, unexpected or mis-shaped key, so nothing loads partially.
    """
    state_dict = unwrap_checkpoint(state_dict)
    # Keys only the official HAT layout has (NAT-family checkpoints also have `patch_embed.`).
    official = any(k.startswith("relative_position_index_") or ".residual_group." in k for k in state_dict)
    if official:
        state_dict = _convert_official(state_dict, model)
    elif not any(re.match(r"groups\.\d+\.blocks\.\d+\.attn\.rpb$", k) for k in state_dict):
        family = guess_family(state_dict) or "unknown"
        raise CheckpointMismatchError(f"expected an official or visattn HAT checkpoint, this one looks like: {family}")
    scale = _checkpoint_scale(state_dict)
    if scale and scale != model.upscale:
        raise CheckpointMismatchError(
            f"checkpoint is a x{scale} HAT (its upsample convs), the model is x{model.upscale}")
    check_state_dict(model, state_dict)
    return state_dict


# ---------------------------------------------------------------------------------------------
# from_official builder (constructor kwargs of the official class)

# Options of the official class that visattn builds only at their released values, and the
# official defaults of those options (its 'upsampler' default '' builds no reconstruction).
_RELEASED_ONLY = dict(upsampler="pixelshuffle", resi_connection="1conv", patch_size=1, ape=False, patch_norm=True,
                      qk_scale=None, drop_rate=0.0, attn_drop_rate=0.0)
_OFFICIAL_DEFAULTS = dict(_RELEASED_ONLY, upsampler="")


@register_official("hat/archs/hat_arch.py::HAT")
def _official_hat(meta: Dict) -> HAT:
    kwargs = meta["constructor_kwargs"]
    official = {**_OFFICIAL_DEFAULTS, **kwargs}
    unsupported = {k: official[k] for k, v in _RELEASED_ONLY.items() if official[k] != v}
    if unsupported:
        raise ValueError(f"visattn builds HAT with {_RELEASED_ONLY}; got {unsupported}")
    window_size = official.get("window_size", 7)
    if min(to_2tuple(official.get("img_size", 64))) <= window_size:
        # The official HAB then shrinks its window to img_size and drops the shift.
        raise ValueError(f"img_size must exceed window_size ({window_size}), got {official.get('img_size', 64)}")
    return HAT(
        upscale=official.get("upscale", 2),
        in_chans=official.get("in_chans", 3),
        embed_dim=official.get("embed_dim", 96),
        depths=official.get("depths", (6, 6, 6, 6)),
        num_heads=official.get("num_heads", (6, 6, 6, 6)),
        window_size=window_size,
        compress_ratio=official.get("compress_ratio", 3),
        squeeze_factor=official.get("squeeze_factor", 30),
        conv_scale=official.get("conv_scale", 0.01),
        overlap_ratio=official.get("overlap_ratio", 0.5),
        mlp_ratio=official.get("mlp_ratio", 4.0),
        qkv_bias=official.get("qkv_bias", True),
        img_range=official.get("img_range", 1.0),
        drop_path_rate=official.get("drop_path_rate", 0.1),
    )


# ---------------------------------------------------------------------------------------------
# timm registration

def _create_hat(variant: str, pretrained: bool = False, **kwargs) -> HAT:
    if kwargs.pop("num_classes", 0):
        raise ValueError(f"{variant} is a super-resolution model: it has no classifier (num_classes must be 0)")
    return build_model_with_cfg(
        HAT, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        kwargs_filter=("num_classes",),  # the SR cfg's num_classes=0 is not a constructor argument
        **kwargs,
    )


def _cfg(official: str, scale: int, release_file: str) -> Dict:
    cfg = sr_cfg(official=official, paper="arXiv:2205.04437", scale=scale, license="apache-2.0",
                 origin_url="https://github.com/XPixelGroup/HAT")
    # The release is on Google Drive / Baidu Netdisk only (no stable file URL): download it by hand
    # and load it with pretrained_cfg_overlay=dict(file=...).
    cfg["notes"] += (f"weights: {release_file} from the official README's Google Drive / Baidu Netdisk folder; "
                     "BasicSR format ({'params_ema': ...})",)
    return cfg


def _cfgs() -> Dict[str, Dict]:
    cfgs = {}
    for scale in (2, 3, 4):
        cfgs[f"visattn_hat_s_x{scale}.df2k"] = _cfg(f"HAT-S_SRx{scale}", scale, f"HAT-S_SRx{scale}.pth")
        cfgs[f"visattn_hat_x{scale}.df2k"] = _cfg(f"HAT_SRx{scale}", scale, f"HAT_SRx{scale}.pth")
        cfgs[f"visattn_hat_x{scale}.in1k_ft_df2k"] = _cfg(
            f"HAT_SRx{scale}_ImageNet-pretrain", scale, f"HAT_SRx{scale}_ImageNet-pretrain.pth")
        cfgs[f"visattn_hat_l_x{scale}.in1k_ft_df2k"] = _cfg(
            f"HAT-L_SRx{scale}_ImageNet-pretrain", scale, f"HAT-L_SRx{scale}_ImageNet-pretrain.pth")
    return cfgs


default_cfgs = generate_default_cfgs(_cfgs())

_SIZES = {
    "s": dict(embed_dim=144, depths=(6,) * 6, num_heads=(6,) * 6, compress_ratio=24, squeeze_factor=24),
    "b": dict(embed_dim=180, depths=(6,) * 6, num_heads=(6,) * 6, compress_ratio=3, squeeze_factor=30),
    "l": dict(embed_dim=180, depths=(6,) * 12, num_heads=(6,) * 12, compress_ratio=3, squeeze_factor=30),
}


def _hat(size: str, scale: int, **kwargs) -> Dict:
    return {**_SIZES[size], "upscale": scale, **kwargs}


@register_model
def visattn_hat_s_x2(pretrained: bool = False, **kwargs) -> HAT:
    """HAT-S x2 (official ``HAT-S_SRx2``), 9.47M params."""
    return _create_hat("visattn_hat_s_x2", pretrained, **_hat("s", 2, **kwargs))


@register_model
def visattn_hat_s_x3(pretrained: bool = False, **kwargs) -> HAT:
    """HAT-S x3 (official ``HAT-S_SRx3``), 9.66M params."""
    return _create_hat("visattn_hat_s_x3", pretrained, **_hat("s", 3, **kwargs))


@register_model
def visattn_hat_s_x4(pretrained: bool = False, **kwargs) -> HAT:
    """HAT-S x4 (official ``HAT-S_SRx4``), 9.62M params."""
    return _create_hat("visattn_hat_s_x4", pretrained, **_hat("s", 4, **kwargs))


@register_model
def visattn_hat_x2(pretrained: bool = False, **kwargs) -> HAT:
    """HAT x2 (official ``HAT_SRx2``; ``.in1k_ft_df2k`` is ``HAT_SRx2_ImageNet-pretrain``), 20.62M params."""
    return _create_hat("visattn_hat_x2", pretrained, **_hat("b", 2, **kwargs))


@register_model
def visattn_hat_x3(pretrained: bool = False, **kwargs) -> HAT:
    """HAT x3 (official ``HAT_SRx3``; ``.in1k_ft_df2k`` is ``HAT_SRx3_ImageNet-pretrain``), 20.81M params."""
    return _create_hat("visattn_hat_x3", pretrained, **_hat("b", 3, **kwargs))


@register_model
def visattn_hat_x4(pretrained: bool = False, **kwargs) -> HAT:
    """HAT x4 (official ``HAT_SRx4``; ``.in1k_ft_df2k`` is ``HAT_SRx4_ImageNet-pretrain``), 20.77M params."""
    return _create_hat("visattn_hat_x4", pretrained, **_hat("b", 4, **kwargs))


@register_model
def visattn_hat_l_x2(pretrained: bool = False, **kwargs) -> HAT:
    """HAT-L x2 (official ``HAT-L_SRx2_ImageNet-pretrain``), 40.70M params."""
    return _create_hat("visattn_hat_l_x2", pretrained, **_hat("l", 2, **kwargs))


@register_model
def visattn_hat_l_x3(pretrained: bool = False, **kwargs) -> HAT:
    """HAT-L x3 (official ``HAT-L_SRx3_ImageNet-pretrain``), 40.88M params."""
    return _create_hat("visattn_hat_l_x3", pretrained, **_hat("l", 3, **kwargs))


@register_model
def visattn_hat_l_x4(pretrained: bool = False, **kwargs) -> HAT:
    """HAT-L x4 (official ``HAT-L_SRx4_ImageNet-pretrain``), 40.85M params."""
    return _create_hat("visattn_hat_l_x4", pretrained, **_hat("l", 4, **kwargs))
