"""A faithful PyTorch port of the official HAT forward: the baseline of ``visattn bench sr``.

This is a benchmark baseline, not a visattn model (it is not registered with timm). It computes
what ``hat/archs/hat_arch.py`` of https://github.com/XPixelGroup/HAT computes, the way it does:

* tokens ``[B, H*W, C]`` between blocks (``patch_embed`` / ``patch_unembed``);
* HAB: ``window_partition`` of the (cyclically shifted) map, explicit ``(q * scale) @ k.transpose``
  attention plus a bias gathered from ``relative_position_bias_table [(2w-1)**2, heads]`` through
  the ``relative_position_index_SA`` buffer, Swin's shifted-window mask (-100 across regions)
  added on shifted blocks, softmax, ``@ v``; the CAB conv branch scaled by ``conv_scale``; the MLP;
* OCAB: queries from ``window_partition``, keys and values from ``nn.Unfold`` of the zero-padded
  key/value map (overlap window ``int(w * overlap_ratio) + w``), the same explicit attention with
  its own ``[(w+o-1)**2, heads]`` table read through ``relative_position_index_OCA`` (negative in
  places: PyTorch indexing wraps those around, as in the official code);
* RHAG: the blocks, OCAB, a 3x3 conv on the un-embedded map, plus the group's input;
* the test-time reflect padding to multiples of the window and the crop of ``hat/models/hat_model.py``.

Module names and the state dict are the official ones (index buffers included), so an official
checkpoint loads with ``load_state_dict``; :meth:`OfficialHATPort.from_visattn` builds the port
from a visattn :class:`~visattn.models.hat.HAT` by converting its state dict to that layout.

Deviations, none of which changes a number: inference only (no dropout or drop path, which are
identities in eval mode; no ``use_checkpoint``; no ``ape``, ``upsampler`` other than
``'pixelshuffle'`` or ``resi_connection`` other than ``'1conv'``, the released configuration), no
``img_size`` (the official HAB shrinks its window when ``img_size <= window_size``, a
configuration visattn refuses too), and the shifted-window mask is built on the input's device
instead of on the CPU and copied over, which only makes the baseline faster.
"""
from __future__ import annotations

import re
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from visattn.models.hat import HAT, official_relative_position_index, official_table_rows

__all__ = ["OfficialHATPort", "hyperparameters_of", "official_state_dict"]

_RGB_MEAN = (0.4488, 0.4371, 0.4040)
_NUM_FEAT = 64


# ---------------------------------------------------------------------------------------------
# shifted-window mask and window partition (hat_arch.py's helpers; the index buffers are hat.py's,
# checked byte for byte against the official ones by the tests)

def window_partition(x: torch.Tensor, window_size: int) -> torch.Tensor:
    """``[B, H, W, C]`` -> ``[B * H/w * W/w, w, w, C]`` (windows row-major, image by image)."""
    B, H, W, C = x.shape
    x = x.view(B, H // window_size, window_size, W // window_size, window_size, C)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, window_size, window_size, C)


def window_reverse(windows: torch.Tensor, window_size: int, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: ``[B * H/w * W/w, w, w, C]`` -> ``[B, H, W, C]``."""
    B = windows.shape[0] // ((height // window_size) * (width // window_size))
    x = windows.view(B, height // window_size, width // window_size, window_size, window_size, -1)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(B, height, width, -1)


def calculate_mask(height: int, width: int, window_size: int, shift_size: int, device: torch.device) -> torch.Tensor:
    """The official ``calculate_mask``: float32 ``[windows, w*w, w*w]``, -100 between tokens of
    different regions of the map shifted by ``-shift_size``, 0 within one region."""
    img_mask = torch.zeros(1, height, width, 1, device=device)
    slices = (slice(0, -window_size), slice(-window_size, -shift_size), slice(-shift_size, None))
    label = 0
    for hs in slices:
        for ws in slices:
            img_mask[:, hs, ws, :] = label
            label += 1
    windows = window_partition(img_mask, window_size).view(-1, window_size * window_size)
    mask = windows.unsqueeze(1) - windows.unsqueeze(2)
    return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)


# ---------------------------------------------------------------------------------------------
# modules, named as in hat_arch.py so that the state dict is the official one

class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _ChannelAttention(nn.Module):
    def __init__(self, dim: int, squeeze_factor: int):
        super().__init__()
        self.attention = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(dim, dim // squeeze_factor, 1), nn.ReLU(inplace=True),
            nn.Conv2d(dim // squeeze_factor, dim, 1), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.attention(x)


class _CAB(nn.Module):
    def __init__(self, dim: int, compress_ratio: int, squeeze_factor: int):
        super().__init__()
        self.cab = nn.Sequential(
            nn.Conv2d(dim, dim // compress_ratio, 3, 1, 1), nn.GELU(),
            nn.Conv2d(dim // compress_ratio, dim, 3, 1, 1), _ChannelAttention(dim, squeeze_factor))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cab(x)


class _WindowAttention(nn.Module):
    """Official ``WindowAttention`` on windows ``[B * windows, w*w, C]``."""

    def __init__(self, dim: int, window_size: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.window_size = window_size
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rpi: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        b_, n, c = x.shape
        qkv = self.qkv(x).reshape(b_, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q * self.scale) @ k.transpose(-2, -1)  # [B * windows, heads, n, n], stored
        bias = self.relative_position_bias_table[rpi.view(-1)].view(n, n, -1).permute(2, 0, 1).contiguous()
        attn = attn + bias.unsqueeze(0)
        if mask is not None:
            nw = mask.shape[0]
            attn = attn.view(b_ // nw, nw, self.num_heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, n, n)
        attn = attn.softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b_, n, c))


class _HAB(nn.Module):
    """Official ``HAB`` on tokens ``[B, H*W, C]``."""

    def __init__(self, dim: int, num_heads: int, window_size: int, shift_size: int, compress_ratio: int,
                 squeeze_factor: int, conv_scale: float, mlp_ratio: float, qkv_bias: bool):
        super().__init__()
        self.window_size = window_size
        self.shift_size = shift_size
        self.conv_scale = conv_scale
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _WindowAttention(dim, window_size, num_heads, qkv_bias)
        self.conv_block = _CAB(dim, compress_ratio, squeeze_factor)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = _Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, x_size: Tuple[int, int], rpi_sa: torch.Tensor,
                attn_mask: torch.Tensor) -> torch.Tensor:
        h, w = x_size
        b, _, c = x.shape
        ws, shift = self.window_size, self.shift_size
        shortcut = x
        x = self.norm1(x).view(b, h, w, c)
        conv_x = self.conv_block(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1).contiguous().view(b, h * w, c)
        shifted = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2)) if shift else x
        windows = window_partition(shifted, ws).view(-1, ws * ws, c)
        windows = self.attn(windows, rpi_sa, attn_mask if shift else None).view(-1, ws, ws, c)
        shifted = window_reverse(windows, ws, h, w)
        attn_x = torch.roll(shifted, shifts=(shift, shift), dims=(1, 2)) if shift else shifted
        x = shortcut + attn_x.view(b, h * w, c) + conv_x * self.conv_scale
        return x + self.mlp(self.norm2(x))


class _OCAB(nn.Module):
    """Official ``OCAB`` (overlapping cross-attention block) on tokens ``[B, H*W, C]``."""

    def __init__(self, dim: int, window_size: int, overlap_ratio: float, num_heads: int, qkv_bias: bool,
                 mlp_ratio: float):
        super().__init__()
        self.dim = dim
        self.window_size = window_size
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.overlap_win_size = int(window_size * overlap_ratio) + window_size
        o = self.overlap_win_size
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.unfold = nn.Unfold(kernel_size=(o, o), stride=window_size, padding=(o - window_size) // 2)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((window_size + o - 1) ** 2, num_heads))
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = _Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, x_size: Tuple[int, int], rpi: torch.Tensor) -> torch.Tensor:
        h, w = x_size
        b, _, c = x.shape
        ws, o, heads = self.window_size, self.overlap_win_size, self.num_heads
        shortcut = x
        x = self.norm1(x).view(b, h, w, c)
        qkv = self.qkv(x).reshape(b, h, w, 3, c).permute(3, 0, 4, 1, 2)  # [3, B, C, H, W]
        q = qkv[0].permute(0, 2, 3, 1)
        kv = torch.cat((qkv[1], qkv[2]), dim=1)  # [B, 2C, H, W]
        q_windows = window_partition(q, ws).view(-1, ws * ws, c)
        # [B, 2C*o*o, windows] -> [2, B*windows, o*o, C] (the official einops rearrange).
        kv_windows = self.unfold(kv)
        nw = kv_windows.shape[-1]
        kv_windows = kv_windows.view(b, 2, c, o * o, nw).permute(1, 0, 4, 3, 2).reshape(2, b * nw, o * o, c)
        b_, nq, _ = q_windows.shape
        n = o * o
        d = self.dim // heads
        q = q_windows.reshape(b_, nq, heads, d).permute(0, 2, 1, 3)
        k = kv_windows[0].reshape(b_, n, heads, d).permute(0, 2, 1, 3)
        v = kv_windows[1].reshape(b_, n, heads, d).permute(0, 2, 1, 3)
        attn = (q * self.scale) @ k.transpose(-2, -1)  # [B * windows, heads, w*w, o*o], stored
        bias = self.relative_position_bias_table[rpi.view(-1)].view(nq, n, -1).permute(2, 0, 1).contiguous()
        attn = (attn + bias.unsqueeze(0)).softmax(dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(b_, nq, self.dim).view(-1, ws, ws, self.dim)
        x = self.proj(window_reverse(out, ws, h, w).view(b, h * w, self.dim)) + shortcut
        return x + self.mlp(self.norm2(x))


class _AttenBlocks(nn.Module):
    def __init__(self, dim: int, depth: int, num_heads: int, window_size: int, compress_ratio: int,
                 squeeze_factor: int, conv_scale: float, overlap_ratio: float, mlp_ratio: float, qkv_bias: bool):
        super().__init__()
        self.blocks = nn.ModuleList([
            _HAB(dim, num_heads, window_size, 0 if i % 2 == 0 else window_size // 2, compress_ratio,
                 squeeze_factor, conv_scale, mlp_ratio, qkv_bias)
            for i in range(depth)
        ])
        self.overlap_attn = _OCAB(dim, window_size, overlap_ratio, num_heads, qkv_bias, mlp_ratio)

    def forward(self, x: torch.Tensor, x_size: Tuple[int, int], params: Dict[str, torch.Tensor]) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x, x_size, params["rpi_sa"], params["attn_mask"])
        return self.overlap_attn(x, x_size, params["rpi_oca"])


class _RHAG(nn.Module):
    def __init__(self, dim: int, **kwargs):
        super().__init__()
        self.residual_group = _AttenBlocks(dim, **kwargs)
        self.conv = nn.Conv2d(dim, dim, 3, 1, 1)

    def forward(self, x: torch.Tensor, x_size: Tuple[int, int], params: Dict[str, torch.Tensor]) -> torch.Tensor:
        y = self.residual_group(x, x_size, params)
        y = y.transpose(1, 2).contiguous().view(x.shape[0], -1, x_size[0], x_size[1])  # patch_unembed
        return self.conv(y).flatten(2).transpose(1, 2) + x  # patch_embed (no norm inside a RHAG)


class _PatchEmbed(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.flatten(2).transpose(1, 2))


class OfficialHATPort(nn.Module):
    """The official HAT forward (see the module docstring), official state-dict layout.

    The constructor takes visattn :class:`~visattn.models.hat.HAT`'s hyper-parameters, with its
    defaults (the released HAT SRx4). Parameters are zeros: load an official state dict, or use
    :meth:`from_visattn`. ``forward``: RGB ``[B, in_chans, H, W]`` in [0, 1], any H, W ->
    ``[B, in_chans, upscale*H, upscale*W]`` (not clamped).
    """

    def __init__(self, upscale: int = 4, in_chans: int = 3, embed_dim: int = 180,
                 depths: Sequence[int] = (6, 6, 6, 6, 6, 6), num_heads: Sequence[int] = (6, 6, 6, 6, 6, 6),
                 window_size: int = 16, compress_ratio: int = 3, squeeze_factor: int = 30, conv_scale: float = 0.01,
                 overlap_ratio: float = 0.5, mlp_ratio: float = 2.0, qkv_bias: bool = True, img_range: float = 1.0):
        super().__init__()
        self.upscale = upscale
        self.window_size = window_size
        self.shift_size = window_size // 2
        self.img_range = img_range
        overlap_size = int(window_size * overlap_ratio) + window_size
        mean = torch.tensor(_RGB_MEAN).view(1, 3, 1, 1) if in_chans == 3 else torch.zeros(1, 1, 1, 1)
        self.register_buffer("mean", mean, persistent=False)  # a plain attribute in the official code
        self.register_buffer("relative_position_index_SA", official_relative_position_index(window_size, window_size))
        self.register_buffer("relative_position_index_OCA", official_relative_position_index(window_size, overlap_size))
        self.conv_first = nn.Conv2d(in_chans, embed_dim, 3, 1, 1)
        self.patch_embed = _PatchEmbed(embed_dim)
        self.layers = nn.ModuleList([
            _RHAG(embed_dim, depth=depth, num_heads=heads, window_size=window_size, compress_ratio=compress_ratio,
                  squeeze_factor=squeeze_factor, conv_scale=conv_scale, overlap_ratio=overlap_ratio,
                  mlp_ratio=mlp_ratio, qkv_bias=qkv_bias)
            for depth, heads in zip(depths, num_heads)
        ])
        self.norm = nn.LayerNorm(embed_dim)
        self.conv_after_body = nn.Conv2d(embed_dim, embed_dim, 3, 1, 1)
        self.conv_before_upsample = nn.Sequential(nn.Conv2d(embed_dim, _NUM_FEAT, 3, 1, 1), nn.LeakyReLU(inplace=True))
        if upscale != 3 and upscale & (upscale - 1):
            raise ValueError(f"scale {upscale} is not supported: the official Upsample takes 2^n and 3")
        factors = [3] if upscale == 3 else [2] * (upscale.bit_length() - 1)
        upsample = []
        for f in factors:
            upsample += [nn.Conv2d(_NUM_FEAT, f * f * _NUM_FEAT, 3, 1, 1), nn.PixelShuffle(f)]
        self.upsample = nn.Sequential(*upsample)
        self.conv_last = nn.Conv2d(_NUM_FEAT, in_chans, 3, 1, 1)

    @classmethod
    def from_visattn(cls, model: HAT) -> "OfficialHATPort":
        """The port of a visattn ``model``: same hyper-parameters (read off its modules), its weights
        converted to the official layout by :func:`official_state_dict` (copies, on ``model``'s
        device and dtype); in eval mode."""
        port = cls(**hyperparameters_of(model))
        sd = official_state_dict(model)
        port.to(device=model.conv_first.weight.device, dtype=model.conv_first.weight.dtype)
        port.load_state_dict(sd, strict=True)  # any key visattn has and the port lacks raises
        return port.eval()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, embed_dim, H, W]`` (H, W multiples of the window) -> ``[B, embed_dim, H, W]``."""
        x_size = (x.shape[2], x.shape[3])
        attn_mask = calculate_mask(x_size[0], x_size[1], self.window_size, self.shift_size, x.device)
        params = {"attn_mask": attn_mask, "rpi_sa": self.relative_position_index_SA,
                  "rpi_oca": self.relative_position_index_OCA}
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x, x_size, params)
        x = self.norm(x)
        return x.transpose(1, 2).contiguous().view(x.shape[0], -1, x_size[0], x_size[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, in_chans, H, W]`` in [0, 1] -> ``[B, in_chans, upscale*H, upscale*W]``."""
        H, W = x.shape[-2:]
        # hat_model.py pre_process: reflect-pad right/bottom to multiples of the window.
        x = F.pad(x, (0, (-W) % self.window_size, 0, (-H) % self.window_size), mode="reflect")
        mean = self.mean.type_as(x)
        x = (x - mean) * self.img_range
        x = self.conv_first(x)
        x = self.conv_after_body(self.forward_features(x)) + x
        x = self.conv_last(self.upsample(self.conv_before_upsample(x)))
        x = x / self.img_range + mean
        return x[..., : H * self.upscale, : W * self.upscale]  # hat_model.py post_process


# ---------------------------------------------------------------------------------------------
# visattn HAT -> the port

def hyperparameters_of(model: HAT) -> Dict[str, object]:
    """The constructor arguments of ``model``, read off its modules. Ratios are recovered as
    ``dim // hidden``; a ratio that does not rebuild the same layer sizes makes the strict state
    dict load of :meth:`OfficialHATPort.from_visattn` raise."""
    dim = model.num_features
    block = model.groups[0].blocks[0]
    ws = model.window_size
    return dict(
        upscale=model.upscale, in_chans=model.in_chans, embed_dim=dim,
        depths=tuple(len(g.blocks) for g in model.groups),
        num_heads=tuple(g.overlap_attn.attn.num_heads for g in model.groups),
        window_size=ws,
        compress_ratio=dim // block.conv_block[0].out_channels,
        squeeze_factor=dim // block.conv_block[3].fc1.out_channels,
        conv_scale=block.conv_scale,
        overlap_ratio=(model.overlap_size - ws) / ws,
        mlp_ratio=block.mlp.fc1.out_features / dim,
        qkv_bias=block.attn.qkv.bias is not None,
        img_range=model.img_range,
    )


def _rpb_to_table(rpb: torch.Tensor, window_size: int, key_window: int) -> torch.Tensor:
    """visattn ``rpb [heads, w+k-1, w+k-1]`` (by key - query offset + w - 1) -> the official table
    ``[(w+k-1)**2, heads]`` from which the official index reads the same bias (the inverse of
    HAT's checkpoint conversion: each offset has its own table row)."""
    rows = official_table_rows(window_size, key_window)
    if rows.unique().numel() != rows.numel():
        raise ValueError(f"the official index of windows ({window_size}, {key_window}) leaves table rows unread")
    table = rpb.new_zeros(rows.numel(), rpb.shape[0])
    table[rows.to(rpb.device)] = rpb.reshape(rpb.shape[0], -1).t()
    return table


# visattn name -> official name (applied in order; `hat.py` documents the forward mapping).
_RENAMES = [
    (r"^embed_norm\.", "patch_embed.norm."),
    (r"^groups\.(\d+)\.blocks\.", r"layers.\1.residual_group.blocks."),
    (r"^groups\.(\d+)\.overlap_attn\.attn\.", r"layers.\1.residual_group.overlap_attn."),
    (r"^groups\.(\d+)\.overlap_attn\.", r"layers.\1.residual_group.overlap_attn."),
    (r"^groups\.(\d+)\.conv\.", r"layers.\1.conv."),
    (r"\.conv_block\.3\.fc1\.", ".conv_block.cab.3.attention.1."),
    (r"\.conv_block\.3\.fc2\.", ".conv_block.cab.3.attention.3."),
    (r"\.conv_block\.([02])\.", r".conv_block.cab.\1."),
    (r"\.rpb$", ".relative_position_bias_table"),
]


def official_state_dict(model: HAT) -> Dict[str, torch.Tensor]:
    """``model``'s weights in the official HAT layout, the two index buffers included (detached
    tensors; the rpb tables are new tensors, everything else shares ``model``'s storage)."""
    ws, overlap = model.window_size, model.overlap_size
    out = {"relative_position_index_SA": official_relative_position_index(ws, ws),
           "relative_position_index_OCA": official_relative_position_index(ws, overlap)}
    for key, value in model.state_dict().items():
        new_key = key
        for pattern, repl in _RENAMES:
            new_key = re.sub(pattern, repl, new_key)
        if key.endswith(".rpb"):
            value = _rpb_to_table(value, ws, overlap if ".overlap_attn." in key else ws)
        out[new_key] = value
    return out
