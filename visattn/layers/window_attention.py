"""Window attention layers (HAT): shifted-window self-attention and overlapping cross-attention.

Both take channels-last maps ``[B, H, W, C]`` whose sides are multiples of the window, and both
keep their relative position bias in visattn's neighborhood-attention layout: ``rpb [heads, R, R]``
indexed by the (key - query) offset, centred (see :func:`window_relative_bias`).

Design: every window runs through ``F.scaled_dot_product_attention`` with the bias as an additive
mask. The shifted windows need Swin's region mask, which ``visattn.kernels.na2d`` cannot express,
and the overlapping windows have more keys than queries, so SDPA serves all three cases with one
code path (on CUDA its memory-efficient kernel takes the additive mask, so the attention matrix is
never stored). For unshifted windows the result equals
``na2d(q, k, v, kernel_size=window, stride=window, rpb=rpb)`` with the same ``rpb`` tensor.

Two things keep SDPA on its fused kernels and off the full ``windows x heads x N x N`` tensors:
the bias is one ``[heads, N, N]`` tensor broadcast over the windows (kept between inference
calls), and Swin's region mask, which is zero except in the last row and column of windows, is
applied by re-running only those windows (:func:`shifted_window_mask` of a 2x2-window map gives
their three mask patterns); head sizes
that are not a multiple of 8 (HAT: 180 / 6 = 30) are zero-padded to one for the call, since the
fused kernels take only those and would otherwise fall back to materialising the attention.
"""
import functools
import weakref
from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import register_notrace_function, register_notrace_module, trunc_normal_

__all__ = ["OverlappingWindowAttention", "WindowAttention", "shifted_window_mask", "window_relative_bias"]


def window_relative_bias(rpb: torch.Tensor, query_window: int) -> torch.Tensor:
    """Expand a relative position table into the attention bias of one window.

    Args:
        rpb: ``[heads, Q + K - 1, Q + K - 1]``; ``rpb[h, dy + Q - 1, dx + Q - 1]`` is the bias for a
            key at offset ``(dy, dx)`` from the query, counted from the corners of the query window
            (``Q x Q``) and key window (``K x K``). With ``K == Q`` this is the ``na2d`` rpb layout.
        query_window: ``Q``.

    Returns:
        ``[heads, Q*Q, K*K]`` with row-major query and key positions.
    """
    heads, size = rpb.shape[0], rpb.shape[-1]
    key_window = size - query_window + 1
    # u[h, a, b, i, j] = rpb[h, a + i, b + j]; flipping a and b turns them into Q-1-yq, Q-1-xq,
    # so the entry for query (yq, xq) and key (i, j) is rpb[h, i - yq + Q - 1, j - xq + Q - 1].
    u = rpb.unfold(1, key_window, 1).unfold(2, key_window, 1)
    return u.flip(1, 2).reshape(heads, query_window * query_window, key_window * key_window)


@register_notrace_function  # builds the mask from Python ints of the map size
def shifted_window_mask(height: int, width: int, window: int, shift: int, dtype: torch.dtype,
                        device: torch.device) -> torch.Tensor:
    """Swin's attention mask for windows of a map cyclically shifted by ``-shift``.

    Tokens that wrapped around come from another image region; pairs from different regions get
    ``-100``, others ``0``. Returns ``[num_windows, window**2, window**2]`` (windows row-major).
    """
    # Region 0: never wrapped; 1: the last window minus the shift; 2: the wrapped-around shift.
    rows = torch.zeros(height, dtype=torch.long, device=device)
    rows[height - window: height - shift] = 1
    rows[height - shift:] = 2
    cols = torch.zeros(width, dtype=torch.long, device=device)
    cols[width - window: width - shift] = 1
    cols[width - shift:] = 2
    labels = rows[:, None] * 3 + cols[None, :]
    labels = labels.view(height // window, window, width // window, window).transpose(1, 2).reshape(-1, window * window)
    different = labels[:, :, None] != labels[:, None, :]
    # -100, the official Swin/HAT value, rather than -inf: the logits equal the official ones.
    return torch.zeros(different.shape, dtype=dtype, device=device).masked_fill_(different, -100.0)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float) -> torch.Tensor:
    """SDPA with an additive ``bias``, head size zero-padded to a multiple of 8 where needed
    (zero columns change neither ``q . k`` nor the first ``D`` output columns)."""
    D = q.shape[-1]
    pad = (-D) % 8 if q.is_cuda else 0
    if pad:
        q, k, v = (F.pad(t, (0, pad)) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
    return out[..., :D] if pad else out


@torch.jit.ignore  # TorchScript would hand it dtypes as ints: it takes the tensor whose dtype / device it wants
def _border_windows(nh: int, nw: int, window: int, shift: int, like: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`_border_window_masks` in the dtype and on the device of ``like``."""
    return _border_window_masks(nh, nw, window, shift, like.dtype, like.device)


@functools.lru_cache(maxsize=64)
def _border_window_masks(nh: int, nw: int, window: int, shift: int, dtype: torch.dtype,
                         device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Ids of the windows in the last window row or column (row-major) and their Swin masks
    ``[len(ids), N, N]``: every last-column, last-row and corner window has the mask of that window
    of :func:`shifted_window_mask` on a 2x2-window map.

    Cached per grid, dtype and device: building them on a GPU takes a host sync (the copy of the
    ids from host memory) and a dozen launches, at every shifted block otherwise."""
    ids = [i * nw + j for i in range(nh) for j in range(nw) if i == nh - 1 or j == nw - 1]
    pattern = torch.tensor([2 * (i // nw == nh - 1) + (i % nw == nw - 1) for i in ids], device=device)
    masks = shifted_window_mask(2 * window, 2 * window, window, shift, dtype, device)[pattern]
    return torch.tensor(ids, device=device), masks


# id(rpb) -> (weak reference to rpb, (its version, pointer, dtype), its expanded bias). Keyed by id:
# a tensor's == is elementwise, so tensors cannot key a (weak) dict.
_BIAS_CACHE: dict = {}


@torch.jit.ignore
def _cached_bias(rpb: torch.Tensor, query_window: int, like: torch.Tensor) -> torch.Tensor:
    """``window_relative_bias(rpb, query_window)`` in the dtype of ``like``; kept between calls when
    no gradient is recorded (inference), recomputed whenever the table changes (its version)."""
    dtype = like.dtype
    if torch.is_grad_enabled() and rpb.requires_grad:
        return window_relative_bias(rpb, query_window).to(dtype)
    key = (rpb._version, rpb.data_ptr(), dtype)
    cached = _BIAS_CACHE.get(id(rpb))
    if cached is None or cached[0]() is not rpb or cached[1] != key:
        for k in [k for k, (ref, _, _) in _BIAS_CACHE.items() if ref() is None]:
            del _BIAS_CACHE[k]  # tables of deleted layers
        cached = _BIAS_CACHE[id(rpb)] = (weakref.ref(rpb), key, window_relative_bias(rpb, query_window).to(dtype))
    return cached[2]


def _check_windows(name: str, height: int, width: int, window: int) -> None:
    if height % window or width % window:
        raise ValueError(f"{name} needs H and W to be multiples of the window {window}, got {height}x{width} "
                         f"(pad the input first, as HAT's forward does)")


@register_notrace_module  # shape checks and shape-dependent masks: torch.fx treats it as a leaf
class WindowAttention(nn.Module):
    """(Shifted-)window multi-head self-attention with relative position bias (Swin W-MSA / SW-MSA).

    With ``shift_size > 0`` the map is rolled by ``-shift_size`` before the windows are cut and
    rolled back after, with Swin's region mask. ``rpb`` is ``[heads, 2w-1, 2w-1]`` (key - query
    offset + w - 1, the ``na2d`` layout).

    Input and output: ``[B, H, W, dim]``, H and W multiples of ``window_size``.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int, shift_size: int = 0, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        if not 0 <= shift_size < window_size:
            raise ValueError(f"shift_size must be in [0, window_size), got {shift_size} for window {window_size}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.window_size = window_size
        self.shift_size = shift_size
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.rpb = nn.Parameter(torch.zeros(num_heads, 2 * window_size - 1, 2 * window_size - 1))
        trunc_normal_(self.rpb, std=0.02)
        self.proj = nn.Linear(dim, dim)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, window_size={self.window_size}, shift_size={self.shift_size}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        ws, shift, heads = self.window_size, self.shift_size, self.num_heads
        _check_windows("WindowAttention", H, W, ws)
        nh, nw = H // ws, W // ws
        if shift:
            x = torch.roll(x, (-shift, -shift), (1, 2))
        # qkv is per token, so it can run before the windows are cut: [3, B, windows, heads, N, D].
        qkv = self.qkv(x).view(B, nh, ws, nw, ws, 3, heads, self.head_dim).permute(5, 0, 1, 3, 6, 2, 4, 7)
        q, k, v = qkv.reshape(3, B, nh * nw, heads, ws * ws, self.head_dim).unbind(0)
        bias = _cached_bias(self.rpb, ws, q)  # [heads, N, N]
        out = _attention(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), bias, self.scale)
        out = out.view(B, nh * nw, heads, ws * ws, self.head_dim)
        if shift:
            # Only the last window row and column hold wrapped-around tokens: redo those windows
            # with the region mask (windows ride along the head axis so it broadcasts over B).
            ids, masks = _border_windows(nh, nw, ws, shift, q)
            border = _attention(q[:, ids].flatten(1, 2), k[:, ids].flatten(1, 2), v[:, ids].flatten(1, 2),
                                (bias + masks.unsqueeze(1)).flatten(0, 1), self.scale)
            out = out.index_copy(1, ids, border.view(B, ids.numel(), heads, ws * ws, self.head_dim))
        out = out.view(B, nh, nw, heads, ws, ws, self.head_dim).permute(0, 1, 4, 2, 5, 3, 6).reshape(B, H, W, C)
        out = self.proj(out)
        if shift:
            out = torch.roll(out, (shift, shift), (1, 2))
        return out


@register_notrace_module  # shape checks: torch.fx treats it as a leaf
class OverlappingWindowAttention(nn.Module):
    """HAT's overlapping cross-attention (the attention of OCAB).

    Queries come from non-overlapping ``w x w`` windows; keys and values from the ``o x o`` windows
    (``o = w + int(w * overlap_ratio)``) centred on them, cut from the key/value maps zero-padded by
    ``(o - w) / 2`` (as ``nn.Unfold`` does in the official code: padded keys are 0, not qkv(0)).
    ``rpb`` is ``[heads, w + o - 1, w + o - 1]``, indexed by the (key - query) image offset
    ``+ (w + o) / 2 - 1``.

    Input and output: ``[B, H, W, dim]``, H and W multiples of ``window_size``.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int, overlap_ratio: float = 0.5,
                 qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        overlap_size = int(window_size * overlap_ratio) + window_size
        if (overlap_size - window_size) % 2:
            # The official Unfold pads (o - w) // 2 per side: an odd overlap misaligns its windows.
            raise ValueError(f"overlap window {overlap_size} - window {window_size} must be even "
                             f"(overlap_ratio {overlap_ratio})")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.window_size = window_size
        self.overlap_size = overlap_size
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.rpb = nn.Parameter(torch.zeros(num_heads, window_size + overlap_size - 1, window_size + overlap_size - 1))
        trunc_normal_(self.rpb, std=0.02)
        self.proj = nn.Linear(dim, dim)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, window_size={self.window_size}, overlap_size={self.overlap_size}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        ws, os_, heads, D = self.window_size, self.overlap_size, self.num_heads, self.head_dim
        _check_windows("OverlappingWindowAttention", H, W, ws)
        nh, nw = H // ws, W // ws
        pad = (os_ - ws) // 2
        qkv = self.qkv(x).view(B, H, W, 3, heads, D)
        q = qkv[:, :, :, 0].reshape(B, nh, ws, nw, ws, heads, D).permute(0, 1, 3, 5, 2, 4, 6)
        q = q.reshape(B * nh * nw, heads, ws * ws, D)
        kv = F.pad(qkv[:, :, :, 1:], (0, 0, 0, 0, 0, 0, pad, pad, pad, pad))  # zero-pad H and W
        kv = kv.unfold(1, os_, ws).unfold(2, os_, ws)  # [B, nh, nw, 2, heads, D, o, o]
        k, v = kv.permute(3, 0, 1, 2, 4, 6, 7, 5).reshape(2, B * nh * nw, heads, os_ * os_, D).unbind(0)
        bias = _cached_bias(self.rpb, ws, q)  # [heads, w*w, o*o]
        out = _attention(q, k, v, bias, self.scale)
        out = out.view(B, nh, nw, heads, ws, ws, D).permute(0, 1, 4, 2, 5, 3, 6).reshape(B, H, W, C)
        return self.proj(out)
