"""Argument normalisation and validation shared by every neighborhood-attention backend."""
from __future__ import annotations

import operator
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Set, Tuple, Union

import torch

IntOrTuple = Union[int, Sequence[int]]


@dataclass(frozen=True)
class NAParams:
    """Validated, per-axis parameters of one neighborhood-attention call."""

    spatial: Tuple[int, ...]
    kernel_size: Tuple[int, ...]
    dilation: Tuple[int, ...]
    stride: Tuple[int, ...]
    heads: int
    head_dim: int
    scale: float


def _as_int(value) -> int:
    # operator.index accepts ints and numpy integers but refuses floats and bools are excluded:
    # a 3.7 kernel or a True dilation must not be silently truncated.
    if isinstance(value, bool):
        raise TypeError
    return operator.index(value)


def _per_axis(name: str, value: IntOrTuple, ndim: int) -> Tuple[int, ...]:
    expected = f"{name} must be an int or a sequence of {ndim} ints, got {value!r}"
    if isinstance(value, (str, bytes)):
        raise ValueError(expected)
    try:
        # Tuples and lists are told apart by type, not by operator.index's TypeError, which
        # torch.compile (dynamo in torch 2.11) turns into an internal error.
        if isinstance(value, (tuple, list)):
            values = tuple(_as_int(v) for v in value)
        else:
            values = _scalar_or_sequence(value, ndim)
    except TypeError:
        raise ValueError(expected) from None
    if len(values) != ndim:
        raise ValueError(expected)
    return values


def _scalar_or_sequence(value, ndim: int) -> Tuple[int, ...]:
    try:
        return (_as_int(value),) * ndim
    except TypeError:
        return tuple(_as_int(v) for v in value)


# Validated calls by signature: a model repeats the same few calls every step, and the checks
# below cost more host time than a kernel launch. Only plain ints / tuples of ints and float /
# None scales form keys, so a call that would be refused (a bool, a float kernel) is never
# answered from the cache.
_CHECKED: Dict[tuple, NAParams] = {}
_MAX_CHECKED = 4096


def _plain(value) -> bool:
    return type(value) is int or (type(value) is tuple and all(type(v) is int for v in value))


def _call_key(ndim, q, k, v, kernel_size, dilation, stride, rpb, scale) -> Optional[tuple]:
    if not (_plain(kernel_size) and _plain(dilation) and _plain(stride) and (scale is None or type(scale) is float)
            and type(q) is torch.Tensor and type(k) is torch.Tensor and type(v) is torch.Tensor
            and (rpb is None or isinstance(rpb, torch.Tensor))):
        return None
    rpb_key = None if rpb is None else (rpb.shape, rpb.dtype, rpb.device)
    return (ndim, q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, q.device, k.device, v.device,
            kernel_size, dilation, stride, rpb_key, scale)


def check_na_args(
    ndim: int,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel_size: IntOrTuple,
    dilation: IntOrTuple,
    stride: IntOrTuple,
    rpb: Optional[torch.Tensor],
    scale: Optional[float],
) -> NAParams:
    """Validate the inputs of ``na{ndim}d`` and return its per-axis parameters.

    Raises ``ValueError`` naming what was expected and what was given.
    """
    if torch.compiler.is_compiling():  # traced once per graph: no cache (nor its mutation) to trace
        return _check_na_args(ndim, q, k, v, kernel_size, dilation, stride, rpb, scale)
    key = _call_key(ndim, q, k, v, kernel_size, dilation, stride, rpb, scale)
    params = _CHECKED.get(key) if key is not None else None
    if params is None:
        params = _check_na_args(ndim, q, k, v, kernel_size, dilation, stride, rpb, scale)
        if key is not None:
            if len(_CHECKED) >= _MAX_CHECKED:
                _CHECKED.clear()
            _CHECKED[key] = params
    return params


def _check_na_args(ndim, q, k, v, kernel_size, dilation, stride, rpb, scale) -> NAParams:
    fn = f"na{ndim}d"
    layout = "[B, " + ", ".join("XYZ"[:ndim]) + ", heads, head_dim]"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != ndim + 3:
            raise ValueError(
                f"{fn}: {name} must be a {ndim + 3}-D tensor {layout}, got shape {tuple(t.shape)}"
            )
    if q.shape != k.shape:
        raise ValueError(f"{fn}: q and k must have the same shape {layout}, got {tuple(q.shape)} and {tuple(k.shape)}")
    if v.shape[:-1] != k.shape[:-1]:
        raise ValueError(
            f"{fn}: v must match k in every dim but head_dim, got v {tuple(v.shape)} and k {tuple(k.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"{fn}: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.is_floating_point():
        raise ValueError(f"{fn}: q, k, v must be floating point, got {q.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{fn}: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")

    kernel = _per_axis("kernel_size", kernel_size, ndim)
    dil = _per_axis("dilation", dilation, ndim)
    strd = _per_axis("stride", stride, ndim)
    spatial = tuple(int(s) for s in q.shape[1 : 1 + ndim])
    for axis, (length, ks, d, s) in enumerate(zip(spatial, kernel, dil, strd)):
        if ks < 1:
            raise ValueError(f"{fn}: kernel_size must be >= 1 on every axis, got {kernel}")
        if d < 1:
            raise ValueError(f"{fn}: dilation must be >= 1 on every axis, got {dil}")
        if s < 1 or s > ks:
            raise ValueError(f"{fn}: stride must be in [1, kernel_size] on every axis, got stride {strd} for kernel_size {kernel}")
        if length < ks * d:
            raise ValueError(
                f"{fn}: axis {axis} has size {length}, but kernel_size * dilation = {ks} * {d} = {ks * d} "
                f"is larger; the op never pads, so every spatial axis must be >= kernel_size * dilation "
                f"(got spatial shape {spatial})"
            )
    heads, head_dim = int(q.shape[-2]), int(q.shape[-1])
    if rpb is not None:
        expected = (heads,) + tuple(2 * ks - 1 for ks in kernel)
        if not isinstance(rpb, torch.Tensor) or tuple(rpb.shape) != expected:
            got = tuple(rpb.shape) if isinstance(rpb, torch.Tensor) else type(rpb).__name__
            raise ValueError(f"{fn}: rpb must have shape [heads, 2k-1, ...] = {expected}, got {got}")
        if not rpb.is_floating_point():
            raise ValueError(f"{fn}: rpb must be a floating-point tensor, got {rpb.dtype}")
        if rpb.device != q.device:
            raise ValueError(f"{fn}: rpb must be on {q.device}, got {rpb.device}")
    if scale is None:
        scale = head_dim ** -0.5
    return NAParams(spatial, kernel, dil, strd, heads, head_dim, float(scale))


_fallback_warned: Set[Tuple[str, str]] = set()


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The autocast dtype in effect for ``device_type``, or ``None`` outside autocast."""
    # Devices autocast does not know (meta, used to count parameters and MACs) are never under it.
    # Traced code sees real devices only, and dynamo (torch 2.11) cannot trace is_autocast_available.
    if not torch.compiler.is_compiling() and not torch.amp.is_autocast_available(device_type):
        return None
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def auto_picks_triton(op: str, q: torch.Tensor, v: torch.Tensor,
                      unsupported_reason: Optional[Callable[[torch.Tensor, torch.Tensor], Optional[str]]],
                      stacklevel: int) -> bool:
    """``backend="auto"``: the Triton kernels for CUDA tensors they support, else the reference.

    A CUDA call that falls back warns once per (op, reason), at the user's frame ``stacklevel``
    calls up; ``unsupported_reason`` is ``None`` when triton cannot be imported.
    """
    if not q.is_cuda:
        return False
    reason = unsupported_reason(q, v) if unsupported_reason is not None else "a torch build without triton"
    if reason is None:
        return True
    if (op, reason) not in _fallback_warned:
        _fallback_warned.add((op, reason))
        warnings.warn(f"visattn.kernels: {op} falls back to the reference backend: the triton backend does not "
                      f"support {reason}", stacklevel=stacklevel + 1)
    return False
