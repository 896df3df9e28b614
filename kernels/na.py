"""Functional neighborhood attention (1-D, 2-D, 3-D) and its backend dispatcher.

All functions take heads-last tensors ``[B, *spatial, heads, head_dim]`` (views with arbitrary
strides are fine, e.g. slices of a fused qkv projection) and return ``[B, *spatial, heads, head_dim]``.
The ``*_qkv`` variants take the packed ``[B, *spatial, 3, heads, head_dim]`` output of a fused qkv
projection itself: the same function of its slices, whose gradient the Triton backend writes as
one packed tensor (the unpacked call's gradients are three tensors that autograd then stacks).
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch

from ._checks import IntOrTuple, NAParams, auto_picks_triton, check_na_args
from .reference import na_reference

Backend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, NAParams, Optional[torch.Tensor]], torch.Tensor]

PackedBackend = Callable[[torch.Tensor, NAParams, Optional[torch.Tensor]], torch.Tensor]

# Name -> implementation.
BACKENDS: Dict[str, Backend] = {"reference": na_reference}
# Implementations with their own packed-qkv path (the others are called on the slices).
PACKED: Dict[Backend, PackedBackend] = {}
try:
    from .triton_na import na_triton, na_triton_packed, unsupported_reason
except ImportError:  # triton ships with torch's Linux builds only
    unsupported_reason = None
else:
    BACKENDS["triton"] = na_triton
    PACKED[na_triton] = na_triton_packed


def available_backends() -> tuple:
    """Names accepted by the ``backend`` argument (besides ``"auto"``)."""
    return tuple(BACKENDS)


def _resolve_backend(backend: str, q: torch.Tensor, v: torch.Tensor) -> Backend:
    if backend == "auto":
        # The warning points at the caller of na1d/na2d/na3d: 3 frames above this one.
        use_triton = auto_picks_triton("neighborhood attention", q, v, unsupported_reason, stacklevel=4)
        return BACKENDS["triton" if use_triton else "reference"]
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected 'auto' or one of {available_backends()}")
    return BACKENDS[backend]


def _na(
    ndim: int,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel_size: IntOrTuple,
    dilation: IntOrTuple,
    stride: IntOrTuple,
    rpb: Optional[torch.Tensor],
    scale: Optional[float],
    backend: str,
) -> torch.Tensor:
    params = check_na_args(ndim, q, k, v, kernel_size, dilation, stride, rpb, scale)
    return _resolve_backend(backend, q, v)(q, k, v, params, rpb)


def _na_qkv(
    ndim: int,
    qkv: torch.Tensor,
    kernel_size: IntOrTuple,
    dilation: IntOrTuple,
    stride: IntOrTuple,
    rpb: Optional[torch.Tensor],
    scale: Optional[float],
    backend: str,
) -> torch.Tensor:
    if not isinstance(qkv, torch.Tensor) or qkv.dim() != ndim + 4 or qkv.shape[-3] != 3:
        got = f"shape {tuple(qkv.shape)}" if isinstance(qkv, torch.Tensor) else type(qkv).__name__
        raise ValueError(f"na{ndim}d_qkv: qkv must be [B, *spatial ({ndim} axes), 3, heads, head_dim], got {got}")
    q, k, v = qkv.unbind(-3)
    params = check_na_args(ndim, q, k, v, kernel_size, dilation, stride, rpb, scale)
    impl = _resolve_backend(backend, q, v)
    packed = PACKED.get(impl)
    return packed(qkv, params, rpb) if packed is not None else impl(q, k, v, params, rpb)


def na1d(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel_size: IntOrTuple,
    dilation: IntOrTuple = 1,
    stride: IntOrTuple = 1,
    rpb: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """1-D neighborhood attention.

    Args:
        q, k, v: ``[B, L, heads, D]`` (v may have its own head_dim).
        kernel_size: window size (odd, or even as in NATTEN >= 0.20: the query then sits at
            ``kernel_size // 2`` in its window); ``L >= kernel_size * dilation``.
        dilation: gap between attended keys (NA runs on each of the ``dilation`` sub-sequences).
        stride: queries in groups of ``stride`` share one window (``stride == kernel_size`` is
            non-overlapping window attention); ``1 <= stride <= kernel_size``.
        rpb: optional relative position bias ``[heads, 2 * kernel_size - 1]``.
        scale: logit scale, default ``D ** -0.5``.
        backend: ``"auto"`` (the fused Triton kernels for CUDA tensors of a supported dtype and
            head_dim, else the reference), or a name from :func:`available_backends`.

    Returns:
        ``[B, L, heads, D_v]``.
    """
    return _na(1, q, k, v, kernel_size, dilation, stride, rpb, scale, backend)


def na2d(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel_size: IntOrTuple,
    dilation: IntOrTuple = 1,
    stride: IntOrTuple = 1,
    rpb: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """2-D neighborhood attention, as :func:`na1d` per axis.

    Args:
        q, k, v: ``[B, H, W, heads, D]``.
        kernel_size, dilation, stride: an int or an ``(h, w)`` pair.
        rpb: optional ``[heads, 2 * kh - 1, 2 * kw - 1]``; the bias of key ``(y, x)`` for query
            ``(qy, qx)`` is ``rpb[h, (y - qy) / dh + kh - 1, (x - qx) / dw + kw - 1]``.

    Returns:
        ``[B, H, W, heads, D_v]``.
    """
    return _na(2, q, k, v, kernel_size, dilation, stride, rpb, scale, backend)


def na3d(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel_size: IntOrTuple,
    dilation: IntOrTuple = 1,
    stride: IntOrTuple = 1,
    rpb: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """3-D neighborhood attention, as :func:`na1d` per axis.

    Args:
        q, k, v: ``[B, T, H, W, heads, D]``.
        kernel_size, dilation, stride: an int or a ``(t, h, w)`` triple.
        rpb: optional ``[heads, 2 * kt - 1, 2 * kh - 1, 2 * kw - 1]``.

    Returns:
        ``[B, T, H, W, heads, D_v]``.
    """
    return _na(3, q, k, v, kernel_size, dilation, stride, rpb, scale, backend)


def na1d_qkv(
    qkv: torch.Tensor,
    kernel_size: IntOrTuple,
    dilation: IntOrTuple = 1,
    stride: IntOrTuple = 1,
    rpb: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """:func:`na1d` of ``qkv.unbind(-3)``: ``qkv`` ``[B, L, 3, heads, D]`` -> ``[B, L, heads, D]``."""
    return _na_qkv(1, qkv, kernel_size, dilation, stride, rpb, scale, backend)


def na2d_qkv(
    qkv: torch.Tensor,
    kernel_size: IntOrTuple,
    dilation: IntOrTuple = 1,
    stride: IntOrTuple = 1,
    rpb: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """:func:`na2d` of ``qkv.unbind(-3)``: ``qkv`` ``[B, H, W, 3, heads, D]`` (a fused qkv
    projection's output, reshaped) -> ``[B, H, W, heads, D]``."""
    return _na_qkv(2, qkv, kernel_size, dilation, stride, rpb, scale, backend)


def na3d_qkv(
    qkv: torch.Tensor,
    kernel_size: IntOrTuple,
    dilation: IntOrTuple = 1,
    stride: IntOrTuple = 1,
    rpb: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """:func:`na3d` of ``qkv.unbind(-3)``: ``qkv`` ``[B, T, H, W, 3, heads, D]`` -> ``[B, T, H, W, heads, D]``."""
    return _na_qkv(3, qkv, kernel_size, dilation, stride, rpb, scale, backend)
