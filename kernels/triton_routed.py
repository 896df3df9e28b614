"""Fused Triton forward and backward of routed attention, reading K and V in place.

Layout: q ``[B, Rq, Tq, heads, D]``, k / v ``[B, Rk, Tk, heads, D]``, routing index ``[B, Rq, topk]``;
or q / k / v ``[B, H, W, heads, D]`` maps whose regions are the windows of a ``region_grid``
(the tokens are addressed where they lie in the map: no region-major copy in or out).

Both walks are *packed*: rather than one step per routed region (16 steps of 4 keys at BiFormer
stage 3, most of each tile masked off), a step covers ``BLOCK`` consecutive entries of the
concatenated sequence, each row gathered from its own region.

* Forward: a program owns ``BLOCK_Q`` queries of one region (one batch, one head). It walks the
  ``topk * Tk`` routed keys in steps of ``BLOCK_K``: key ``e`` is token ``e % Tk`` of region
  ``index[b, r, e // Tk]``, loaded from where it lies (no gathered ``topk x`` copy). An online
  softmax (base 2) gives the output and the log-sum-exp.
* Backward, query-centric: the same walk recomputes P, accumulates dQ in registers and writes
  ``delta = rowsum(dO * O)``.
* Backward, key-centric: the routing is inverted into a CSR list (for each key region, the query
  regions that routed to it; one counting-sort launch, :func:`_invert_routing`); a program owns
  ``BLOCK_K2`` keys of one region and walks the ``count * Tq`` queries of those regions in packed
  steps of ``BLOCK_Q2`` (query ``e`` is token ``e % Tq`` of the list's region ``e // Tq``),
  accumulating dK and dV in registers: no atomics. Its launch (step length, warps, stages) is
  tuned on the GPU per shape class (:func:`_dkdv_candidates`): uneven routing makes one key
  region's walk the kernel's critical path.

A region routed twice by one query region appears twice in both walks, so its tokens count twice,
as in the reference's concatenation.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from ._triton_common import LOG2E, CallCache, KernelCall, Tuner, dot, unsupported_reason


@triton.jit
def _packed_rows(regions_ptr, offs_e, e_valid, TOKENS):
    """Entry ``e`` of a packed walk: token ``e % TOKENS`` of region ``regions_ptr[e // TOKENS]``."""
    region = tl.load(regions_ptr + offs_e // TOKENS, mask=e_valid, other=0)
    return region, offs_e % TOKENS


@triton.jit
def _offset(r, t, s_r, s_rc, s_t, s_tc, REGION_COLS, TOKEN_COLS):
    """Memory offset of token ``t`` of region ``r``. Regions and the tokens of a region each lie on
    a row-major grid of ``REGION_COLS`` / ``TOKEN_COLS`` columns with (row, column) strides
    ``(s_r, s_rc)`` / ``(s_t, s_tc)``: 1 column is the ``[B, R, T, ...]`` layout, more are the
    windows of a ``[B, H, W, ...]`` map (Triton specializes the 1s away)."""
    return (r // REGION_COLS) * s_r + (r % REGION_COLS) * s_rc + (t // TOKEN_COLS) * s_t + (t % TOKEN_COLS) * s_tc


@triton.jit
def _query_tile(q_ptr, s_qb, s_qr, s_qrc, s_qt, s_qtc, s_qh, s_qd, TQ, HEADS, HEAD_DIM, REGION_COLS, TOKEN_COLS,
                qk_scale, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr):
    """The query tile of a forward / dQ program (axis 0: region and tile, axis 1: batch and head):
    its region, token offsets, batch, head, masks, and the tile scaled by ``qk_scale``."""
    q_tiles = tl.cdiv(TQ, BLOCK_Q)
    r = tl.program_id(0) // q_tiles
    offs_q = (tl.program_id(0) % q_tiles) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    b = (tl.program_id(1) // HEADS).to(tl.int64)
    n = tl.program_id(1) % HEADS
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < HEAD_DIM
    q_valid = offs_q < TQ
    q_mask = q_valid[:, None] & d_valid[None, :]
    q_rows = _offset(r, offs_q, s_qr, s_qrc, s_qt, s_qtc, REGION_COLS, TOKEN_COLS)
    q = tl.load(q_ptr + b * s_qb + n * s_qh + q_rows[:, None] + offs_d[None, :] * s_qd, mask=q_mask, other=0.0)
    q = (q.to(tl.float32) * qk_scale).to(q_ptr.dtype.element_ty)
    return r, offs_q, b, n, offs_d, d_valid, q_valid, q_mask, q


@triton.jit
def _routed_keys(k_ptr, v_ptr, routed, k0, num_keys, kv_base, s_kr, s_krc, s_kt, s_ktc, s_kd, TK, REGION_COLS,
                 TOKEN_COLS, offs_d, d_valid, BLOCK_K: tl.constexpr):
    """Step ``k0`` of the packed walk over the routed keys: the valid mask and the K and V rows."""
    offs_e = k0 + tl.arange(0, BLOCK_K)
    k_valid = offs_e < num_keys
    kr, t = _packed_rows(routed, offs_e, k_valid, TK)
    kv_off = kv_base + _offset(kr, t, s_kr, s_krc, s_kt, s_ktc, REGION_COLS, TOKEN_COLS)[:, None] + offs_d[None, :] * s_kd
    kv_mask = k_valid[:, None] & d_valid[None, :]
    return k_valid, tl.load(k_ptr + kv_off, mask=kv_mask, other=0.0), tl.load(v_ptr + kv_off, mask=kv_mask, other=0.0)


@triton.jit
def _routed_fwd_kernel(
    q_ptr, k_ptr, v_ptr, idx_ptr, out_ptr, lse_ptr,
    s_qb, s_qr, s_qrc, s_qt, s_qtc, s_qh, s_qd,
    s_kb, s_kr, s_krc, s_kt, s_ktc, s_kh, s_kd,
    s_ob, s_or, s_orc, s_ot, s_otc, s_oh, s_od,
    RQ, TQ, TK, TOPK, HEADS, HEAD_DIM, REGION_COLS, TOKEN_COLS, qk_scale,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
):
    r, offs_q, b, n, offs_d, d_valid, q_valid, q_mask, q = _query_tile(
        q_ptr, s_qb, s_qr, s_qrc, s_qt, s_qtc, s_qh, s_qd, TQ, HEADS, HEAD_DIM, REGION_COLS, TOKEN_COLS, qk_scale,
        BLOCK_Q, BLOCK_D)

    m_i = tl.full([BLOCK_Q], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_Q], tl.float32)
    acc = tl.zeros([BLOCK_Q, BLOCK_D], tl.float32)
    routed = idx_ptr + (b * RQ + r) * TOPK
    kv_base = b * s_kb + n * s_kh
    num_keys = TOPK * TK
    for k0 in range(0, num_keys, BLOCK_K):
        k_valid, k, v = _routed_keys(k_ptr, v_ptr, routed, k0, num_keys, kv_base, s_kr, s_krc, s_kt, s_ktc, s_kd, TK,
                                     REGION_COLS, TOKEN_COLS, offs_d, d_valid, BLOCK_K)
        s = tl.where(k_valid[None, :], dot(q, tl.trans(k), IEEE), -1.0e30)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.where(k_valid[None, :], tl.exp2(s - m_new[:, None]), 0.0)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, IEEE)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(lse_ptr + (b * HEADS + n) * RQ * TQ + r * TQ + offs_q, m_i + tl.log2(l_i), mask=q_valid)
    o_rows = _offset(r, offs_q, s_or, s_orc, s_ot, s_otc, REGION_COLS, TOKEN_COLS)
    tl.store(out_ptr + b * s_ob + n * s_oh + o_rows[:, None] + offs_d[None, :] * s_od,
             out.to(out_ptr.dtype.element_ty), mask=q_mask)


@triton.jit
def _routed_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, idx_ptr, out_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
    s_qb, s_qr, s_qrc, s_qt, s_qtc, s_qh, s_qd,
    s_kb, s_kr, s_krc, s_kt, s_ktc, s_kh, s_kd,
    s_ob, s_or, s_orc, s_ot, s_otc, s_oh, s_od,
    RQ, TQ, TK, TOPK, HEADS, HEAD_DIM, REGION_COLS, TOKEN_COLS, qk_scale, scale,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
):
    # out, dO and dQ share the (contiguous) output strides s_o*.
    r, offs_q, b, n, offs_d, d_valid, q_valid, q_mask, q = _query_tile(
        q_ptr, s_qb, s_qr, s_qrc, s_qt, s_qtc, s_qh, s_qd, TQ, HEADS, HEAD_DIM, REGION_COLS, TOKEN_COLS, qk_scale,
        BLOCK_Q, BLOCK_D)
    o_rows = _offset(r, offs_q, s_or, s_orc, s_ot, s_otc, REGION_COLS, TOKEN_COLS)
    o_off = b * s_ob + n * s_oh + o_rows[:, None] + offs_d[None, :] * s_od
    do = tl.load(do_ptr + o_off, mask=q_mask, other=0.0)
    o = tl.load(out_ptr + o_off, mask=q_mask, other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
    stat_off = (b * HEADS + n) * RQ * TQ + r * TQ + offs_q
    tl.store(delta_ptr + stat_off, delta, mask=q_valid)
    lse = tl.load(lse_ptr + stat_off, mask=q_valid, other=0.0)

    dq = tl.zeros([BLOCK_Q, BLOCK_D], tl.float32)
    routed = idx_ptr + (b * RQ + r) * TOPK
    kv_base = b * s_kb + n * s_kh
    num_keys = TOPK * TK
    for k0 in range(0, num_keys, BLOCK_K):
        k_valid, k, v = _routed_keys(k_ptr, v_ptr, routed, k0, num_keys, kv_base, s_kr, s_krc, s_kt, s_ktc, s_kd, TK,
                                     REGION_COLS, TOKEN_COLS, offs_d, d_valid, BLOCK_K)
        p = tl.where(k_valid[None, :] & q_valid[:, None], tl.exp2(dot(q, tl.trans(k), IEEE) - lse[:, None]), 0.0)
        ds = p * (dot(do, tl.trans(v), IEEE) - delta[:, None])
        if IEEE:
            dq += dot(ds, k.to(tl.float32), IEEE)
        else:
            dq += dot(ds.to(k.dtype), k, IEEE)
    tl.store(dq_ptr + o_off, (dq * scale).to(dq_ptr.dtype.element_ty), mask=q_mask)


@triton.jit
def _routed_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, csr_offsets_ptr, csr_regions_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    s_qb, s_qr, s_qrc, s_qt, s_qtc, s_qh, s_qd,
    s_kb, s_kr, s_krc, s_kt, s_ktc, s_kh, s_kd,
    s_ob, s_or, s_orc, s_ot, s_otc, s_oh, s_od,
    s_gb, s_gr, s_grc, s_gt, s_gtc, s_gh, s_gd,
    RQ, RK, TQ, TK, TOPK, HEADS, HEAD_DIM, REGION_COLS, TOKEN_COLS, qk_scale,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
):
    # s_o*: dO's strides; s_g*: those of the (contiguous) dK and dV.
    k_tiles = tl.cdiv(TK, BLOCK_K)
    kr = tl.program_id(0) // k_tiles
    offs_k = (tl.program_id(0) % k_tiles) * BLOCK_K + tl.arange(0, BLOCK_K)
    b = (tl.program_id(1) // HEADS).to(tl.int64)
    n = tl.program_id(1) % HEADS
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < HEAD_DIM
    k_valid = offs_k < TK
    k_mask = k_valid[:, None] & d_valid[None, :]
    k_rows = _offset(kr, offs_k, s_kr, s_krc, s_kt, s_ktc, REGION_COLS, TOKEN_COLS)
    kv_off = b * s_kb + n * s_kh + k_rows[:, None] + offs_d[None, :] * s_kd
    k = tl.load(k_ptr + kv_off, mask=k_mask, other=0.0)
    v = tl.load(v_ptr + kv_off, mask=k_mask, other=0.0)

    dk = tl.zeros([BLOCK_K, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_K, BLOCK_D], tl.float32)
    start = tl.load(csr_offsets_ptr + b * (RK + 1) + kr)
    end = tl.load(csr_offsets_ptr + b * (RK + 1) + kr + 1)
    routing = csr_regions_ptr + b * RQ * TOPK + start
    num_queries = (end - start) * TQ  # zero for a key region no query region picked: dK = dV = 0
    stat_base = (b * HEADS + n) * RQ * TQ
    for q0 in range(0, num_queries, BLOCK_Q):
        offs_e = q0 + tl.arange(0, BLOCK_Q)
        q_valid = offs_e < num_queries
        r, t = _packed_rows(routing, offs_e, q_valid, TQ)
        r = r.to(tl.int64)
        q_mask = q_valid[:, None] & d_valid[None, :]
        q_rows = _offset(r, t, s_qr, s_qrc, s_qt, s_qtc, REGION_COLS, TOKEN_COLS)
        q = tl.load(q_ptr + b * s_qb + n * s_qh + q_rows[:, None] + offs_d[None, :] * s_qd, mask=q_mask, other=0.0)
        q = (q.to(tl.float32) * qk_scale).to(q_ptr.dtype.element_ty)
        o_rows = _offset(r, t, s_or, s_orc, s_ot, s_otc, REGION_COLS, TOKEN_COLS)
        do = tl.load(do_ptr + b * s_ob + n * s_oh + o_rows[:, None] + offs_d[None, :] * s_od, mask=q_mask, other=0.0)
        stat_off = stat_base + r * TQ + t
        lse = tl.load(lse_ptr + stat_off, mask=q_valid, other=0.0)
        delta = tl.load(delta_ptr + stat_off, mask=q_valid, other=0.0)
        valid = k_valid[:, None] & q_valid[None, :]
        p_t = tl.where(valid, tl.exp2(dot(k, tl.trans(q), IEEE) - lse[None, :]), 0.0)  # [BLOCK_K, BLOCK_Q]
        ds_t = p_t * (dot(v, tl.trans(do), IEEE) - delta[None, :])
        if IEEE:
            dv += dot(p_t, do.to(tl.float32), IEEE)
            dk += dot(ds_t, q.to(tl.float32), IEEE)
        else:
            dv += dot(p_t.to(do.dtype), do, IEEE)
            dk += dot(ds_t.to(q.dtype), q, IEEE)
    dk = dk * (1.0 / 1.4426950408889634)  # q carried scale * log2(e); dK needs scale alone
    g_rows = _offset(kr, offs_k, s_gr, s_grc, s_gt, s_gtc, REGION_COLS, TOKEN_COLS)
    g_off = b * s_gb + n * s_gh + g_rows[:, None] + offs_d[None, :] * s_gd
    tl.store(dk_ptr + g_off, dk.to(dk_ptr.dtype.element_ty), mask=k_mask)
    tl.store(dv_ptr + g_off, dv.to(dv_ptr.dtype.element_ty), mask=k_mask)


class _Tiles(NamedTuple):
    """Tile sizes of one call."""
    q: int   # queries per forward / dQ program
    k: int   # packed routed keys per step of the forward / dQ walk
    k2: int  # keys per dK / dV program
    q2: int  # packed routing queries per step of the dK / dV walk
    d: int   # head_dim, padded


def _pow2_tile(rows: int) -> int:
    # A power of two in [16, 64]: tl.dot needs every dim >= 16, and small regions should not pay
    # for a 64-row tile.
    return min(64, max(16, triton.next_power_of_2(rows)))


def _tiles(tq: int, tk: int, topk: int, head_dim: int) -> _Tiles:
    """The tiles for regions of ``tq`` queries / ``tk`` keys with ``topk`` routed regions."""
    # The number of query regions routing to a key region varies with the key region, so the dK /
    # dV walk's step is not fitted to it: 32 packs several small regions, 64 suits large ones.
    return _Tiles(q=_pow2_tile(tq), k=_pow2_tile(topk * tk), k2=_pow2_tile(tk), q2=64 if tq >= 64 else 32,
                  d=max(16, triton.next_power_of_2(head_dim)))


class DkdvConfig(NamedTuple):
    """A launch of the key-centric dK / dV kernel."""
    keys: int     # keys per program
    queries: int  # packed routing queries per step
    num_warps: int
    num_stages: int


def _dkdv_candidates(tiles: _Tiles) -> List[DkdvConfig]:
    """Launch candidates of the dK / dV kernel, tuned on the GPU per shape class; the first (the
    fixed tiles of :func:`_tiles`, Triton's default warps and stages) is the interpreter's. A key
    region that many query regions routed to is one long walk (at BiFormer-S stage 1 with random
    weights, 52 of 64): longer steps or more warps may shorten it; fewer keys per program (more
    programs per region) measured slower on the H200."""
    k2, q2 = tiles.k2, tiles.q2
    return [DkdvConfig(k2, q2, 4, 3), DkdvConfig(k2, 2 * q2, 4, 3), DkdvConfig(k2, 2 * q2, 8, 3),
            DkdvConfig(k2, q2, 8, 3), DkdvConfig(k2, q2, 4, 2)]


# Tuned dK / dV launches per shape class, with every candidate's milliseconds (for the benchmarks).
DKDV_TUNER = Tuner()


class _Geometry(NamedTuple):
    """Regions of one call: counts and tokens of the query / key regions, and the column counts of
    :func:`_offset` (1 and 1 for ``[B, R, T, heads, D]`` tensors)."""
    rq: int
    tq: int
    rk: int
    tk: int
    region_cols: int
    token_cols: int


def _geometry(q: torch.Tensor, k: torch.Tensor, region_grid: Optional[Sequence[int]]) -> _Geometry:
    if region_grid is None:
        return _Geometry(q.shape[1], q.shape[2], k.shape[1], k.shape[2], 1, 1)
    nh, nw = region_grid
    h, w = q.shape[1] // nh, q.shape[2] // nw
    return _Geometry(nh * nw, h * w, nh * nw, h * w, nw, w)


def _strides(t: torch.Tensor, region_grid: Optional[Sequence[int]]) -> Tuple[int, ...]:
    """``(batch, region row, region column, token row, token column, head, dim)`` strides of ``t``
    (``[B, R, T, heads, D]``, or a ``[B, H, W, heads, D]`` map cut into ``region_grid`` windows)."""
    if region_grid is None:
        sb, sr, st, sh, sd = t.stride()
        return sb, sr, 0, st, 0, sh, sd
    sb, sy, sx, sh, sd = t.stride()
    h, w = t.shape[1] // region_grid[0], t.shape[2] // region_grid[1]
    return sb, h * sy, w * sx, sy, sx, sh, sd


# The launches of each call signature (the forward's, the backward's pair). Outputs and output
# gradients are contiguous, so q's and k's shapes and strides fix every stride a kernel takes.
_CALLS = CallCache()


def _call_key(kind: str, q: torch.Tensor, k: torch.Tensor, index: torch.Tensor, scale: float,
              region_grid: Optional[Sequence[int]]) -> tuple:
    return (kind, q.shape, q.stride(), k.shape, k.stride(), q.dtype, index.shape[-1], scale,
            None if region_grid is None else tuple(region_grid), q.device)


def routed_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor, scale: float,
                   region_grid: Optional[Sequence[int]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fused forward; returns the output (contiguous, q's layout) and the base-2 log-sum-exp
    ``[B, heads, Rq*Tq]`` (region-major)."""
    if k.stride() != v.stride():
        k, v = k.contiguous(), v.contiguous()
    geo = _geometry(q, k, region_grid)
    B, heads, D = q.shape[0], q.shape[-2], q.shape[-1]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((B, heads, geo.rq * geo.tq), dtype=torch.float32, device=q.device)

    def build() -> KernelCall:
        topk = index.shape[-1]
        tiles = _tiles(geo.tq, geo.tk, topk, D)
        return KernelCall(
            _routed_fwd_kernel, (geo.rq * triton.cdiv(geo.tq, tiles.q), B * heads),
            (*_strides(q, region_grid), *_strides(k, region_grid), *_strides(out, region_grid),
             geo.rq, geo.tq, geo.tk, topk, heads, D, geo.region_cols, geo.token_cols, scale * LOG2E),
            dict(BLOCK_Q=tiles.q, BLOCK_K=tiles.k, BLOCK_D=tiles.d, IEEE=q.dtype == torch.float32))

    _CALLS.get(_call_key("fwd", q, k, index, scale, region_grid), build)(q, k, v, index, out, lse)
    return out, lse


def _invert_routing(index: torch.Tensor, num_key_regions: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """CSR of the routing: for batch b and key region r, ``regions[b, offsets[b, r]:offsets[b, r+1]]``
    are the query regions that routed to r, in increasing order (a query region that picked r
    twice is listed twice). One launch (:func:`_invert_routing_kernel`): this runs once per layer
    and step, where a sort and a binary search cost several launches of host time."""
    B, Rq, topk = index.shape
    offsets = torch.empty((B, num_key_regions + 1), dtype=torch.int32, device=index.device)
    regions = torch.empty((B, Rq * topk), dtype=torch.int32, device=index.device)
    call = _CALLS.get(("invert", B, Rq, topk, num_key_regions, index.device), lambda: KernelCall(
        _invert_routing_kernel, (B,), (Rq * topk, num_key_regions, topk),
        dict(BLOCK_N=triton.next_power_of_2(Rq * topk))))
    call(index, offsets, regions)
    return offsets, regions


def routed_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor,
                    out: torch.Tensor, lse: torch.Tensor, scale: float,
                    region_grid: Optional[Sequence[int]] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused backward: ``(dq, dk, dv)`` in the inputs' dtypes and layouts (accumulated in fp32)."""
    if k.stride() != v.stride():
        k, v = k.contiguous(), v.contiguous()
    grad_out = grad_out if grad_out.stride() == out.stride() else grad_out.contiguous()
    geo = _geometry(q, k, region_grid)
    dq = torch.empty(out.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    delta = torch.empty_like(lse)

    dq_tensors = (q, k, v, index, out, grad_out, lse, delta, dq)
    offsets, regions = _invert_routing(index, geo.rk)
    dkdv_tensors = (q, k, v, offsets, regions, grad_out, lse, delta, dk, dv)

    def build() -> Tuple[KernelCall, KernelCall]:
        B, heads, D = q.shape[0], q.shape[-2], q.shape[-1]
        topk = index.shape[-1]
        tiles = _tiles(geo.tq, geo.tk, topk, D)
        ieee = q.dtype == torch.float32
        q_strides, k_strides, o_strides = _strides(q, region_grid), _strides(k, region_grid), _strides(out, region_grid)
        dq_call = KernelCall(
            _routed_bwd_dq_kernel, (geo.rq * triton.cdiv(geo.tq, tiles.q), B * heads),
            (*q_strides, *k_strides, *o_strides,
             geo.rq, geo.tq, geo.tk, topk, heads, D, geo.region_cols, geo.token_cols, scale * LOG2E, scale),
            dict(BLOCK_Q=tiles.q, BLOCK_K=tiles.k, BLOCK_D=tiles.d, IEEE=ieee))

        def dkdv_call(cfg: DkdvConfig) -> KernelCall:
            return KernelCall(
                _routed_bwd_dkdv_kernel, (geo.rk * triton.cdiv(geo.tk, cfg.keys), B * heads),
                (*q_strides, *k_strides, *_strides(grad_out, region_grid), *_strides(dk, region_grid),
                 geo.rq, geo.rk, geo.tq, geo.tk, topk, heads, D, geo.region_cols, geo.token_cols, scale * LOG2E),
                dict(BLOCK_Q=cfg.queries, BLOCK_K=cfg.keys, BLOCK_D=tiles.d, IEEE=ieee,
                     num_warps=cfg.num_warps, num_stages=cfg.num_stages))

        shape_class = (geo, topk, D, q.dtype, (B * heads).bit_length())
        if shape_class not in DKDV_TUNER.best:
            dq_call(*dq_tensors)  # delta, which the dK / dV launches read while they are timed
        cfg = DKDV_TUNER.pick(shape_class, _dkdv_candidates(tiles), lambda cfg: dkdv_call(cfg)(*dkdv_tensors))
        return dq_call, dkdv_call(cfg)

    dq_call, dkdv_call = _CALLS.get(_call_key("bwd", q, k, index, scale, region_grid), build)
    dq_call(*dq_tensors)
    dkdv_call(*dkdv_tensors)
    return dq, dk, dv


# Eager calls use the autograd.Function below; traced calls (torch.compile) use these custom ops
# with fake implementations, as for neighborhood attention (kernels/triton_na.py says why).
# ``region_grid`` is ``[]`` for ``[B, R, T, heads, D]`` tensors (custom ops take no Optional lists).
@torch.library.custom_op("visattn::routed_forward", mutates_args=())
def _routed_forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor,
                       scale: float, region_grid: List[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    return routed_forward(q, k, v, index, scale, region_grid or None)


@_routed_forward_op.register_fake
def _(q, k, v, index, scale, region_grid):
    B, heads = q.shape[0], q.shape[-2]
    return q.new_empty(q.shape), q.new_empty((B, heads, q.shape[1] * q.shape[2]), dtype=torch.float32)


@torch.library.custom_op("visattn::routed_backward", mutates_args=())
def _routed_backward_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor,
                        out: torch.Tensor, lse: torch.Tensor, scale: float,
                        region_grid: List[int]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return routed_backward(grad_out, q, k, v, index, out, lse, scale, region_grid or None)


@_routed_backward_op.register_fake
def _(grad_out, q, k, v, index, out, lse, scale, region_grid):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, index, scale, region_grid = inputs
    ctx.save_for_backward(q, k, v, index, *output)
    ctx.scale, ctx.region_grid = scale, region_grid


def _backward(ctx, grad_out, grad_lse):
    q, k, v, index, out, lse = ctx.saved_tensors
    dq, dk, dv = _routed_backward_op(grad_out, q, k, v, index, out, lse, ctx.scale, ctx.region_grid)
    return dq, dk, dv, None, None, None


torch.library.register_autograd("visattn::routed_forward", _backward, setup_context=_setup_context)


class _RoutedTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, index, scale, region_grid):
        out, lse = routed_forward(q, k, v, index, scale, region_grid)
        ctx.save_for_backward(q, k, v, index, out, lse)
        ctx.scale, ctx.region_grid = scale, region_grid
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, index, out, lse = ctx.saved_tensors
        dq, dk, dv = routed_backward(grad_out, q, k, v, index, out, lse, ctx.scale, ctx.region_grid)
        return dq, dk, dv, None, None, None


def routed_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor, scale: float,
                  region_grid: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """The ``"triton"`` backend of :func:`visattn.kernels.routed_attention` (``region_grid=None``)
    and :func:`visattn.kernels.routed_attention_2d`."""
    reason = unsupported_reason(q, v)
    if reason is not None:
        raise ValueError(f"the triton routed-attention backend does not support {reason}")
    if torch.compiler.is_compiling():
        return _routed_forward_op(q, k, v, index.contiguous(), scale, list(region_grid or ()))[0]
    return _RoutedTriton.apply(q, k, v, index.contiguous(), scale, region_grid)


# --------------------------------------------------------------------------------------------
# Routing: BiFormer's region descriptors and top-k in two launches, and the routing's inverse.
# --------------------------------------------------------------------------------------------

# Most key regions the top-k kernel holds in one row of registers.
MAX_ROUTING_REGIONS = 1024


@triton.jit
def _region_means_kernel(
    q_ptr, k_ptr, desc_ptr,
    s_qb, s_qh, s_qw, s_qc, s_kb, s_kh, s_kw, s_kc,
    B, R, C, REGION_COLS, REGION_H, REGION_W,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # One program per (batch, region): the fp32 means of its q and k tokens, into
    # desc [2, B, R, C] (q means first).
    pid = tl.program_id(0)
    b = (pid // R).to(tl.int64)
    r = pid % R
    y0 = (r // REGION_COLS) * REGION_H
    x0 = (r % REGION_COLS) * REGION_W
    offs_c = tl.arange(0, BLOCK_C)
    c_valid = offs_c < C
    tokens = REGION_H * REGION_W
    q_sum = tl.zeros([BLOCK_C], tl.float32)
    k_sum = tl.zeros([BLOCK_C], tl.float32)
    for t0 in range(0, tokens, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        y = (y0 + t // REGION_W).to(tl.int64)
        x = (x0 + t % REGION_W).to(tl.int64)
        mask = (t < tokens)[:, None] & c_valid[None, :]
        q = tl.load(q_ptr + (b * s_qb + y * s_qh + x * s_qw)[:, None] + offs_c[None, :] * s_qc, mask=mask, other=0.0)
        k = tl.load(k_ptr + (b * s_kb + y * s_kh + x * s_kw)[:, None] + offs_c[None, :] * s_kc, mask=mask, other=0.0)
        q_sum += tl.sum(q.to(tl.float32), axis=0)
        k_sum += tl.sum(k.to(tl.float32), axis=0)
    out = desc_ptr + (b * R + r) * C + offs_c
    tl.store(out, q_sum / tokens, mask=c_valid)
    tl.store(out + B * R * C, k_sum / tokens, mask=c_valid)


@triton.jit
def _region_topk_kernel(
    desc_ptr, index_ptr, B, R, C, scale, TOPK,
    BLOCK_RQ: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # BLOCK_RQ query regions of one batch against all its key regions: logits (scale q) . k in
    # fp32, then TOPK rounds of "largest remaining logit, lowest region on a tie" (a stable sort's
    # order; a NaN logit counts as +inf, as torch.sort ranks NaN first).
    b = tl.program_id(1).to(tl.int64)
    rq = tl.program_id(0) * BLOCK_RQ + tl.arange(0, BLOCK_RQ)
    rk = tl.arange(0, BLOCK_R)
    rq_valid = rq < R
    rk_valid = rk < R
    q_base = desc_ptr + b * R * C
    k_base = desc_ptr + (B + b) * R * C
    logits = tl.zeros([BLOCK_RQ, BLOCK_R], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_valid = c < C
        q = tl.load(q_base + rq[:, None] * C + c[None, :], mask=rq_valid[:, None] & c_valid[None, :], other=0.0)
        k = tl.load(k_base + rk[:, None] * C + c[None, :], mask=rk_valid[:, None] & c_valid[None, :], other=0.0)
        logits += dot(q * scale, tl.trans(k), True)
    logits = tl.where(logits != logits, float("inf"), logits)
    available = tl.broadcast_to(rk_valid[None, :], [BLOCK_RQ, BLOCK_R])
    for slot in range(0, TOPK):
        best = tl.max(tl.where(available, logits, float("-inf")), axis=1)
        chosen = tl.min(tl.where(available & (logits == best[:, None]), rk[None, :], BLOCK_R), axis=1)
        tl.store(index_ptr + (b * R + rq) * TOPK + slot, chosen.to(tl.int64), mask=rq_valid)
        available = available & (rk[None, :] != chosen[:, None])


@triton.jit
def _invert_routing_kernel(index_ptr, offsets_ptr, regions_ptr, N, RK, TOPK, BLOCK_N: tl.constexpr):
    # One program per batch: a counting sort of its N = Rq * topk routing entries by key region,
    # stable (query region order kept): offsets [B, RK + 1] and regions [B, N] (int32).
    b = tl.program_id(0).to(tl.int64)
    e = tl.arange(0, BLOCK_N)
    key = tl.load(index_ptr + b * N + e, mask=e < N, other=-1)
    start = 0
    for r in range(0, RK):
        hit = (key == r).to(tl.int32)
        tl.store(regions_ptr + b * N + start + tl.cumsum(hit, axis=0) - 1, (e // TOPK).to(tl.int32), mask=hit > 0)
        tl.store(offsets_ptr + b * (RK + 1) + r, start)
        start += tl.sum(hit, axis=0)
    tl.store(offsets_ptr + b * (RK + 1) + RK, start)


def region_topk_2d_triton(q: torch.Tensor, k: torch.Tensor, region_grid: Tuple[int, int], topk: int,
                          scale: float) -> torch.Tensor:
    """The ``"triton"`` backend of :func:`visattn.kernels.region_topk_2d` (shapes already checked):
    int64 ``[B, nh * nw, topk]``."""
    B, H, W, C = q.shape
    nh, nw = region_grid
    R = nh * nw
    if R > MAX_ROUTING_REGIONS:
        raise ValueError(f"region_topk_2d: the triton backend routes at most {MAX_ROUTING_REGIONS} regions, "
                         f"got {nh}x{nw}; use backend='reference'")
    desc = torch.empty((2, B, R, C), dtype=torch.float32, device=q.device)
    index = torch.empty((B, R, topk), dtype=torch.int64, device=q.device)

    def build() -> Tuple[KernelCall, KernelCall]:
        block_c = triton.next_power_of_2(C)
        block_r = max(16, triton.next_power_of_2(R))
        block_rq = max(16, min(block_r, 4096 // block_r))
        means = KernelCall(_region_means_kernel, (B * R,),
                           (*q.stride(), *k.stride(), B, R, C, nw, H // nh, W // nw),
                           dict(BLOCK_T=max(1, min(64, 4096 // block_c)), BLOCK_C=block_c))
        select = KernelCall(_region_topk_kernel, (triton.cdiv(R, block_rq), B), (B, R, C, scale, topk),
                            dict(BLOCK_RQ=block_rq, BLOCK_R=block_r, BLOCK_C=max(16, min(block_c, 64))))
        return means, select

    means, select = _CALLS.get(("topk", q.shape, q.stride(), k.stride(), q.dtype, tuple(region_grid), topk, scale,
                                q.device), build)
    means(q, k, desc)
    select(desc, index)
    return index
