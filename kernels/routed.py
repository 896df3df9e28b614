"""Routed (block-sparse) attention: queries grouped in regions attend only to the key regions a
router picked for them.

The op is model-agnostic: any "route each query block to a few key blocks" scheme maps onto it by
laying tokens out as ``[B, regions, tokens_per_region, heads, D]`` and giving, per query region,
the indices of its key regions. BiFormer's bi-level routing attention is the composition
``region descriptors (means) -> region_topk -> routed_attention``, on its maps
``region_topk_2d -> routed_attention_2d`` (``visattn.layers``); other block-sparse schemes (fixed
local + global blocks, learned routers) pass their own index.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch

from ._checks import auto_picks_triton

try:
    from .triton_routed import MAX_ROUTING_REGIONS, region_topk_2d_triton, routed_triton, unsupported_reason
except ImportError:  # triton ships with torch's Linux builds only
    region_topk_2d_triton = routed_triton = unsupported_reason = None
    MAX_ROUTING_REGIONS = 0


def region_topk(q_desc: torch.Tensor, k_desc: torch.Tensor, topk: int) -> torch.Tensor:
    """The ``topk`` key regions of highest ``q_desc . k_desc`` for every query region.

    Args:
        q_desc: ``[B, Rq, C]`` query-region descriptors; k_desc: ``[B, Rk, C]``.
        topk: regions per query region, ``1 <= topk <= Rk``.

    Returns:
        int64 ``[B, Rq, topk]``, by descending logit; equal logits keep the lower region index
        first (a stable sort), so the choice is deterministic on every device.
    """
    if q_desc.dim() != 3 or k_desc.dim() != 3 or q_desc.shape[0] != k_desc.shape[0] or q_desc.shape[2] != k_desc.shape[2]:
        raise ValueError(f"region_topk: expected q_desc [B, Rq, C] and k_desc [B, Rk, C], got {tuple(q_desc.shape)} "
                         f"and {tuple(k_desc.shape)}")
    if not 1 <= topk <= k_desc.shape[1]:
        raise ValueError(f"region_topk: topk must be in [1, {k_desc.shape[1]}] (the number of key regions), got {topk}")
    logits = q_desc @ k_desc.transpose(-1, -2)
    return torch.sort(logits, dim=-1, descending=True, stable=True).indices[..., :topk]


_ROUTING_BACKENDS = ("auto", "reference", "triton")


def region_topk_2d(q: torch.Tensor, k: torch.Tensor, region_grid: Union[int, Sequence[int]], topk: int,
                   scale: float = 1.0, backend: str = "auto") -> torch.Tensor:
    """BiFormer's routing on 2-D maps: for every window of a ``region_grid``, the ``topk`` windows
    whose mean key best matches its mean query, ``region_topk(scale * mean(q), mean(k), topk)``.

    Args:
        q, k: ``[B, H, W, C]`` maps (any strides, e.g. slices of one qkv projection); the routing
            is not differentiated (pass detached tensors or not, the index has no gradient).
        region_grid: an int (square grid) or ``(nh, nw)`` dividing ``H`` and ``W``; windows are
            numbered row-major, as in :func:`routed_attention_2d`.
        topk: windows per window, ``1 <= topk <= nh * nw``.
        scale: factor of the mean queries (BiFormer: ``qk_dim ** -0.5``).
        backend: ``"reference"`` runs the official op sequence (means, scale and logits in the
            inputs' dtype, a stable sort); ``"triton"`` computes them in fp32 in two launches (so
            under bf16 autocast it may pick differently where the reference's bf16 logits tie);
            ``"auto"``: triton for CUDA tensors (of at most 1024 windows), else the reference.

    Returns:
        int64 ``[B, nh * nw, topk]``, by descending logit; equal logits keep the lower window first.
    """
    if not isinstance(q, torch.Tensor) or not isinstance(k, torch.Tensor) or q.dim() != 4 or q.shape != k.shape:
        shapes = [tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for t in (q, k)]
        raise ValueError(f"region_topk_2d: q and k must be [B, H, W, C] maps of one shape, got {shapes[0]} and {shapes[1]}")
    if backend not in _ROUTING_BACKENDS:
        raise ValueError(f"region_topk_2d: unknown backend {backend!r}; expected one of {_ROUTING_BACKENDS}")
    nh, nw = _region_grid(region_grid, q, "region_topk_2d")
    if not 1 <= topk <= nh * nw:
        raise ValueError(f"region_topk_2d: topk must be in [1, {nh * nw}] (the number of windows), got {topk}")
    dtype_ok = q.dtype == k.dtype and q.dtype in (torch.float16, torch.bfloat16, torch.float32)
    if backend == "auto":
        backend = ("triton" if q.is_cuda and region_topk_2d_triton is not None and dtype_ok
                   and nh * nw <= MAX_ROUTING_REGIONS else "reference")
    if backend == "triton":
        if region_topk_2d_triton is None:
            raise ValueError("region_topk_2d: backend='triton' needs triton, which this torch build lacks")
        if not dtype_ok:
            raise ValueError(f"region_topk_2d: the triton backend takes q and k of one dtype among float16, bfloat16 "
                             f"and float32, got {q.dtype} and {k.dtype}")
        if torch.compiler.is_compiling():
            return _region_topk_2d_op(q, k, [nh, nw], topk, float(scale))
        return region_topk_2d_triton(q, k, (nh, nw), topk, float(scale))
    B, H, W, _ = q.shape
    q_desc, k_desc = (t.detach().reshape(B, nh, H // nh, nw, W // nw, -1).mean((2, 4)).reshape(B, nh * nw, -1)
                      for t in (q, k))
    return region_topk(q_desc * scale, k_desc, topk)


@torch.library.custom_op("visattn::region_topk_2d", mutates_args=())
def _region_topk_2d_op(q: torch.Tensor, k: torch.Tensor, region_grid: List[int], topk: int,
                       scale: float) -> torch.Tensor:
    # The traced form of the triton backend (torch.compile cannot trace into a Triton launch).
    return region_topk_2d_triton(q, k, tuple(region_grid), topk, scale)


@_region_topk_2d_op.register_fake
def _(q, k, region_grid, topk, scale):
    return q.new_empty((q.shape[0], region_grid[0] * region_grid[1], topk), dtype=torch.int64)


def _check_5d(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fn: str, layout: str) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 5:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{fn}: {name} must be a 5-D tensor {layout}, got {got}")


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor, fn: str, query_regions: int) -> None:
    """Agreement of q / k / v (already 5-D) and the index ``[B, query_regions, topk]``."""
    if k.shape[:-1] != v.shape[:-1]:
        raise ValueError(f"{fn}: k and v must agree in every dim but head_dim, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[3:] != k.shape[3:]:
        raise ValueError(f"{fn}: q and k must share batch, heads and head_dim, got {tuple(q.shape)} and {tuple(k.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        raise ValueError(f"{fn}: q, k, v must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if index.dtype != torch.int64 or index.dim() != 3 or tuple(index.shape[:2]) != (q.shape[0], query_regions):
        raise ValueError(f"{fn}: index must be int64 [B, query_regions, topk] = [{q.shape[0]}, {query_regions}, topk], "
                         f"got {index.dtype} {tuple(index.shape)}")


def _gathered_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor,
                        scale: float) -> torch.Tensor:
    """The official BiFormer algorithm: gather the routed key/value regions (``topk x`` copies of K
    and V) and attend densely inside them, in the dtype of the inputs."""
    B, Rq, Tq, heads, D = q.shape
    topk, Tk = index.shape[-1], k.shape[2]
    batch = torch.arange(B, device=q.device)[:, None, None]
    k_sel = k[batch, index].reshape(B, Rq, topk * Tk, heads, D)
    v_sel = v[batch, index].reshape(B, Rq, topk * Tk, heads, v.shape[-1])
    logits = torch.einsum("brqhd,brkhd->brhqk", q * scale, k_sel)
    return torch.einsum("brhqk,brkhd->brqhd", logits.softmax(dim=-1), v_sel)


def routed_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor,
                               scale: float) -> torch.Tensor:
    """The numerical reference: the gather algorithm, with half precision computed in fp32."""
    if q.dtype in (torch.float16, torch.bfloat16):
        return _gathered_attention(q.float(), k.float(), v.float(), index, scale).to(q.dtype)
    return _gathered_attention(q, k, v, index, scale)


def routed_attention_gather(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor,
                            scale: float) -> torch.Tensor:
    """A faithful port of the official implementation (the gather in the inputs' dtype), the
    baseline of the benchmarks."""
    return _gathered_attention(q, k, v, index, scale)


_BACKENDS = ("auto", "reference", "gather", "triton")


def _checked_backend(q: torch.Tensor, v: torch.Tensor, index: torch.Tensor, key_regions: int, backend: str,
                     check_index: bool, fn: str) -> str:
    """The backend that runs the call ("auto" resolved), after the index range check."""
    if backend not in _BACKENDS:
        raise ValueError(f"{fn}: unknown backend {backend!r}; expected one of {_BACKENDS}")
    if check_index and index.numel() and index.device.type != "meta" and not torch.compiler.is_compiling():
        # Out-of-range regions would be read from arbitrary memory by the fused kernels.
        in_range = (index >= 0).all() & (index < key_regions).all()
        if index.is_cuda:
            torch._assert_async(in_range, f"{fn}: index holds a region outside [0, key_regions)")
        elif not bool(in_range):
            raise ValueError(f"{fn}: index must hold key-region numbers in [0, {key_regions}), got values in "
                             f"[{int(index.min())}, {int(index.max())}]")
    if backend == "auto":
        backend = "triton" if auto_picks_triton("routed attention", q, v, unsupported_reason, stacklevel=3) else "reference"
    if backend == "triton" and routed_triton is None:
        raise ValueError(f"{fn}: backend='triton' needs triton, which this torch build lacks")
    return backend


def routed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor,
                     scale: Optional[float] = None, backend: str = "auto", check_index: bool = True) -> torch.Tensor:
    """Every query of region ``r`` attends to all tokens of the key regions ``index[b, r, :]``.

    Args:
        q: ``[B, Rq, Tq, heads, D]`` queries grouped by region (Tq tokens per region).
        k, v: ``[B, Rk, Tk, heads, D]`` / ``[B, Rk, Tk, heads, Dv]`` keys and values by region.
        index: int64 ``[B, Rq, topk]``, key-region indices in ``[0, Rk)`` (e.g. from
            :func:`region_topk`); the same routing serves every head.
        scale: logit scale, default ``D ** -0.5``.
        backend: ``"auto"`` (the fused Triton kernels for CUDA tensors they support, else the
            reference), ``"triton"``, ``"reference"`` (half precision computed in fp32) or
            ``"gather"`` (the official algorithm in the inputs' dtype: ``topk`` copies of K / V).
        check_index: verify that every index lies in ``[0, Rk)`` (a ValueError on CPU, an
            asynchronous device assert on CUDA); callers whose index comes from
            :func:`region_topk` may pass ``False`` to save the extra launches.

    Returns:
        ``[B, Rq, Tq, heads, Dv]``: ``softmax(scale q K_r^T) V_r`` with ``K_r, V_r`` the
        concatenated ``topk * Tk`` routed tokens.
    """
    _check_5d(q, k, v, "routed_attention", "[B, regions, tokens_per_region, heads, head_dim]")
    _check(q, k, v, index, "routed_attention", q.shape[1])
    backend = _checked_backend(q, v, index, k.shape[1], backend, check_index, "routed_attention")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if backend == "triton":
        return routed_triton(q, k, v, index, scale)
    if backend == "gather":
        return routed_attention_gather(q, k, v, index, scale)
    return routed_attention_reference(q, k, v, index, scale)


def _region_grid(region_grid: Union[int, Sequence[int]], q: torch.Tensor, fn: str = "routed_attention_2d") -> Tuple[int, int]:
    grid = (region_grid, region_grid) if isinstance(region_grid, int) and not isinstance(region_grid, bool) else region_grid
    try:
        nh, nw = (int(n) for n in grid)
    except (TypeError, ValueError):
        raise ValueError(f"{fn}: region_grid must be an int or a pair of ints, got {region_grid!r}") from None
    H, W = q.shape[1:3]
    if nh < 1 or nw < 1 or H % nh or W % nw:
        raise ValueError(f"{fn}: the {H}x{W} map must divide into region_grid {nh}x{nw} windows "
                         f"(positive counts dividing H and W; pad the map first)")
    return nh, nw


def _to_regions(t: torch.Tensor, nh: int, nw: int) -> torch.Tensor:
    B, H, W, heads, D = t.shape
    t = t.reshape(B, nh, H // nh, nw, W // nw, heads, D).permute(0, 1, 3, 2, 4, 5, 6)
    return t.reshape(B, nh * nw, (H // nh) * (W // nw), heads, D)


def _from_regions(t: torch.Tensor, nh: int, nw: int, H: int, W: int) -> torch.Tensor:
    B, _, _, heads, D = t.shape
    t = t.reshape(B, nh, nw, H // nh, W // nw, heads, D).permute(0, 1, 3, 2, 4, 5, 6)
    return t.reshape(B, H, W, heads, D)


def routed_attention_2d(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor,
                        region_grid: Union[int, Sequence[int]], scale: Optional[float] = None, backend: str = "auto",
                        check_index: bool = True) -> torch.Tensor:
    """:func:`routed_attention` on 2-D maps whose regions are the windows of a grid (BiFormer's layout).

    Args:
        q, k, v: ``[B, H, W, heads, D]`` (v: ``Dv``), any strides (e.g. slices of one qkv
            projection); the maps are cut into ``region_grid = (nh, nw)`` windows of
            ``(H / nh) x (W / nw)`` tokens, numbered row-major. k and v share q's map size.
        index: int64 ``[B, nh * nw, topk]`` key windows per query window.
        region_grid: an int (square grid) or ``(nh, nw)``; must divide ``H`` and ``W``.
        scale, backend, check_index: as :func:`routed_attention`.

    Returns:
        ``[B, H, W, heads, Dv]``: each query attends to the tokens of its routed windows. The
        Triton kernels read and write the maps where they lie; the other backends go through the
        region-major layout of :func:`routed_attention`.
    """
    _check_5d(q, k, v, "routed_attention_2d", "[B, H, W, heads, head_dim]")
    nh, nw = _region_grid(region_grid, q)
    _check(q, k, v, index, "routed_attention_2d", nh * nw)
    if k.shape[1:3] != q.shape[1:3]:
        raise ValueError(f"routed_attention_2d: k and v must be maps of q's size {tuple(q.shape[1:3])}, got {tuple(k.shape[1:3])}")
    backend = _checked_backend(q, v, index, nh * nw, backend, check_index, "routed_attention_2d")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if backend == "triton":
        return routed_triton(q, k, v, index, scale, (nh, nw))
    regions = [_to_regions(t, nh, nw) for t in (q, k, v)]
    attend = routed_attention_gather if backend == "gather" else routed_attention_reference
    return _from_regions(attend(*regions, index, scale), nh, nw, q.shape[1], q.shape[2])
