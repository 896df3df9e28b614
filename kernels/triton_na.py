"""Fused Triton kernels of 1-D / 2-D / 3-D neighborhood attention (dilation, stride, rpb).

Every call is lifted to three spatial axes ``(T, H, W)`` (a 2-D call has ``T == 1``, a 1-D call
``T == H == 1``), so one set of kernels serves all ranks. Dilation splits each axis into
interleaved sub-grids; a program works inside one sub-grid of one (batch, head).

* Forward, query-centric: a program owns a tile of ``TILE_T x TILE_H x TILE_W`` queries. Their
  windows lie inside a key *halo* per axis (``TILE + kernel - 1`` positions without stride; with
  stride as few as the tile's stride groups reach, ``kernel`` when the tile sits in one group, as
  in window attention), computed exactly on the host (:func:`_axis_extents`); the program walks
  the halo ``ROWS`` key rows (of ``BLOCK_KW`` keys along W) per step, computes the logits of
  the whole query tile against them with ``tl.dot``, masks keys outside each query's own window,
  adds the rpb and folds the step into an online softmax (base 2). Only the output and the
  log-sum-exp reach memory: nothing of size ``N x k^d``. With window tables (a launch option, tuned
  like the others) the masks and the rpb of each step come instead from a small table per *tile
  class* (tiles whose queries see the same windows: all interior tiles share one), built on the
  host once per geometry and, with rpb, filled from it per call by one small launch; the table
  enters the logits as a matrix product onto ``q k^T``, so it is loaded through the same pipeline
  as K and V.
* Backward, query-centric (``_na_bwd_dq_kernel``): the same walk recomputes the probabilities from
  the log-sum-exp and accumulates dQ in registers. The rpb gradient is first reduced over the
  queries of each tile row by a matmul with a 0/1 offset matrix, then added atomically into a small
  fp32 scratch of ``_RPB_SLOTS`` partial sums per head (so concurrent programs rarely collide),
  summed afterwards. ``delta = rowsum(dO * O)`` is written for the second kernel.
* Backward, key-centric (``_na_bwd_dkdv_kernel``): a program owns a tile of keys and walks the
  queries whose windows contain them (the inverse neighborhood, an exact box per axis), accumulating
  dK and dV in registers: no atomics and no fp32 copies of the gradients.

Launch configurations (tile shape, key rows per step, warps, pipeline stages) are tuned on the GPU once per shape
class (:func:`_tuned`); under ``TRITON_INTERPRET=1`` (CPU), which cannot time kernels, the first
candidate is used.
"""
from __future__ import annotations

import bisect
import functools
import math
import re
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import triton
import triton.language as tl

from ._checks import NAParams
from .reference import neighborhood_index
from ._triton_common import CallCache, KernelCall, Tuner, dot, unsupported_reason

# Partial sums per head of the rpb gradient: enough that concurrent programs rarely share one.
_RPB_SLOTS = 128
# Largest register tile (elements) of a program's rpb-gradient sum; larger kernels (3-D, k >= 9)
# add each step's partial sums atomically instead.
_RPB_ACC_MAX = 8192
# Largest forward window table (elements per head) read instead of computing the windows.
_TABLE_MAX = 1 << 20


@triton.jit
def _window_start(sub_pos, sub_len, KERNEL: tl.constexpr, STRIDE: tl.constexpr):
    # NATTEN semantics on one sub-grid axis: the window of the stride group's centre query,
    # shifted to stay inside [0, sub_len).
    leader = tl.minimum((sub_pos // STRIDE) * STRIDE + STRIDE // 2, sub_len - 1)
    return tl.minimum(tl.maximum(leader - KERNEL // 2, 0), sub_len - KERNEL)


@triton.jit
def _query_range(j0, j1, sub_len, KERNEL: tl.constexpr, STRIDE: tl.constexpr, SPAN: tl.constexpr):
    # The queries [lo, hi] whose windows reach a key in [j0, j1] (empty: lo > hi). Windows are
    # monotone in the query, and no query below j0 - KERNEL - STRIDE + 1 reaches j0, so SPAN
    # candidates from there (SPAN >= tile + 2 * (KERNEL + STRIDE)) hold every one of them.
    cand = tl.maximum(j0 - KERNEL - STRIDE + 1, 0) + tl.arange(0, SPAN)
    start = _window_start(tl.minimum(cand, sub_len - 1), sub_len, KERNEL, STRIDE)
    hit = (cand < sub_len) & (start <= j1) & (start + KERNEL > j0)
    return tl.min(tl.where(hit, cand, sub_len), axis=0), tl.max(tl.where(hit, cand, -1), axis=0)


@triton.jit
def _subgrid(T, H, W, DT: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr):
    """This program's dilation group (grid axis 2) and the sub-grid lengths it implies."""
    pid_g = tl.program_id(2)
    gt = pid_g // (DH * DW)
    gh = (pid_g // DW) % DH
    gw = pid_g % DW
    return gt, gh, gw, (T - gt + DT - 1) // DT, (H - gh + DH - 1) // DH, (W - gw + DW - 1) // DW


@triton.jit
def _tile(len_t, len_h, len_w, TILE_T: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr):
    """Sub-grid coordinates of this program's tile (grid axis 0): its origin and its positions,
    clamped into the sub-grid, with their validity."""
    pid = tl.program_id(0)
    tiles_w = tl.cdiv(len_w, TILE_W)
    tiles_h = tl.cdiv(len_h, TILE_H)
    t0 = (pid // (tiles_w * tiles_h)) * TILE_T
    h0 = ((pid // tiles_w) % tiles_h) * TILE_H
    w0 = (pid % tiles_w) * TILE_W
    offs = tl.arange(0, TILE_T * TILE_H * TILE_W)
    pt = t0 + offs // (TILE_H * TILE_W)
    ph = h0 + (offs // TILE_W) % TILE_H
    pw = w0 + offs % TILE_W
    valid = (pt < len_t) & (ph < len_h) & (pw < len_w)
    return t0, h0, w0, tl.minimum(pt, len_t - 1), tl.minimum(ph, len_h - 1), tl.minimum(pw, len_w - 1), valid


@triton.jit
def _query_windows(
    T, H, W, HEADS,
    KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, DT: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    ST: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    TILE_T: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr,
):
    """Setup of the query-centric kernels: dilation group and sub-grid lengths, (batch, head), this
    program's query tile (sub-grid positions, validity), each query's window start and the tile's
    key-halo origin (windows are monotone in the query: the tile's first query opens the halo)."""
    gt, gh, gw, len_t, len_h, len_w = _subgrid(T, H, W, DT, DH, DW)
    t0, h0, w0, qt, qh, qw, q_valid = _tile(len_t, len_h, len_w, TILE_T, TILE_H, TILE_W)
    b = (tl.program_id(1) // HEADS).to(tl.int64)
    n = tl.program_id(1) % HEADS
    # One flat tuple, the form of helper returns these kernels have been compiled with on the GPU.
    return (gt, gh, gw, len_t, len_h, len_w, t0, h0, w0, qt, qh, qw, q_valid, b, n,
            _window_start(qt, len_t, KT, ST), _window_start(qh, len_h, KH, SH), _window_start(qw, len_w, KW, SW),
            _window_start(t0, len_t, KT, ST), _window_start(h0, len_h, KH, SH), _window_start(w0, len_w, KW, SW))


@triton.jit
def _step_columns(halo_w, len_w, start_w, KW: tl.constexpr, ROWS: tl.constexpr, BLOCK_KW: tl.constexpr):
    """The loop-invariant key columns of a step of ROWS key rows x BLOCK_KW columns (key e is row
    e // BLOCK_KW, column e % BLOCK_KW): row offsets, columns, their validity / clamped value, and
    which lie in each query's window."""
    e = tl.arange(0, ROWS * BLOCK_KW)
    kx = halo_w + e % BLOCK_KW
    kx_valid = kx < len_w
    in_cols = (kx[None, :] >= start_w[:, None]) & (kx[None, :] < start_w[:, None] + KW) & kx_valid[None, :]
    return e // BLOCK_KW, kx, kx_valid, tl.minimum(kx, len_w - 1), in_cols


@triton.jit
def _rpb_offsets_first_step(kx, kr, qt, qh, qw, halo_t, halo_h, s_rt, s_rh, s_rw,
                            KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr):
    """[TQ, ROWS * BLOCK_KW] offsets of the rpb entries (and of the rpb-gradient scratch, which has
    the rpb's strides) for the first step of the query-centric walk; step (a, r) adds
    ``a * s_rt + r * s_rh``, so the walk adds one scalar instead of recomputing them."""
    return ((kx[None, :] - qw[:, None] + KW - 1) * s_rw + ((halo_t - qt + KT - 1) * s_rt)[:, None]
            + ((halo_h + kr)[None, :] - qh[:, None] + KH - 1) * s_rh)


@triton.jit
def _offsets(b, n, pt, ph, pw, gt, gh, gw, DT: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
             s_b, s_t, s_h, s_w, s_n):
    """Element offsets of sub-grid positions (pt, ph, pw) in a [B, T, H, W, heads, D] tensor."""
    return (b * s_b + n * s_n + (pt * DT + gt).to(tl.int64) * s_t + (ph * DH + gh).to(tl.int64) * s_h
            + (pw * DW + gw).to(tl.int64) * s_w)


@triton.jit
def _grad_offsets(b, n, pt, ph, pw, gt, gh, gw, offs_d, DT: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
                  s_ib, s_it, s_ih, s_iw, s_in, s_id, s_ob, s_ot, s_oh, s_ow, s_on, s_od,
                  GRAD_LIKE_INPUT: tl.constexpr):
    """[positions, BLOCK_D] offsets of the gradients dQ / dK / dV: laid out as the inputs (slices
    of one packed qkv gradient) or as the output (contiguous)."""
    if GRAD_LIKE_INPUT:
        return (_offsets(b, n, pt, ph, pw, gt, gh, gw, DT, DH, DW, s_ib, s_it, s_ih, s_iw, s_in)[:, None]
                + offs_d[None, :] * s_id)
    return (_offsets(b, n, pt, ph, pw, gt, gh, gw, DT, DH, DW, s_ob, s_ot, s_oh, s_ow, s_on)[:, None]
            + offs_d[None, :] * s_od)


@triton.jit
def _q_unit(HAS_RPB: tl.constexpr):
    """What q is multiplied by besides the scale (rounded once to its dtype, in every kernel alike):
    1 with rpb, so the logits are natural like the bias; log2(e) without, so they are base 2."""
    if HAS_RPB:
        return 1.0
    return 1.4426950408889634


@triton.jit
def _base2_unit(HAS_RPB: tl.constexpr):
    """The factor from the logits ``u`` to base-2 logits: ``log2(e) / _q_unit``."""
    if HAS_RPB:
        return 1.4426950408889634
    return 1.0


@triton.jit
def _logits(qk, rpb_ptrs, in_window, HAS_RPB: tl.constexpr):
    """A step's logits ``u = q_s . k (+ rpb)`` (fp32), -inf outside the windows, so exp2 zeroes
    those keys without a select. exp2 takes ``u * _base2_unit - m2``: with rpb one fused
    multiply-add per element, without one add (q_s carries log2(e))."""
    if HAS_RPB:
        return qk + tl.load(rpb_ptrs, mask=in_window, other=float("-inf")).to(tl.float32)
    return tl.where(in_window, qk, float("-inf"))


@triton.jit
def _na_fwd_kernel(
    q_ptr, k_ptr, v_ptr, rpb_ptr, out_ptr, lse_ptr, table_ptr, class_ptr,
    s_ib, s_it, s_ih, s_iw, s_in, s_id,
    s_ob, s_ot, s_oh, s_ow, s_on, s_od,
    s_rn, s_rt, s_rh, s_rw,
    T, H, W, HEADS, HEAD_DIM, scale, s_table_n, no_key_below,
    KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    DT: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    ST: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    TILE_T: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr,
    HALO_T: tl.constexpr, HALO_H: tl.constexpr, BLOCK_KW: tl.constexpr, ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr, HAS_RPB: tl.constexpr, IEEE: tl.constexpr, TABLE: tl.constexpr, SPLIT: tl.constexpr,
):
    (gt, gh, gw, len_t, len_h, len_w, t0, h0, w0, qt, qh, qw, q_valid, b, n,
     start_t, start_h, start_w, halo_t, halo_h, halo_w) = _query_windows(
        T, H, W, HEADS, KT, KH, KW, DT, DH, DW, ST, SH, SW, TILE_T, TILE_H, TILE_W)
    TQ: tl.constexpr = TILE_T * TILE_H * TILE_W

    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < HEAD_DIM
    q_off = _offsets(b, n, qt, qh, qw, gt, gh, gw, DT, DH, DW, s_ib, s_it, s_ih, s_iw, s_in)
    q = tl.load(q_ptr + q_off[:, None] + offs_d[None, :] * s_id, mask=q_valid[:, None] & d_valid[None, :], other=0.0)
    q = (q.to(tl.float32) * (scale * _q_unit(HAS_RPB))).to(q_ptr.dtype.element_ty)  # q_s, as in the backward

    kr, kx, kx_valid, kx_c, in_cols = _step_columns(halo_w, len_w, start_w, KW, ROWS, BLOCK_KW)
    if TABLE:
        # The tile's window mask (+ rpb) per step, [TQ, ROWS * BLOCK_KW] in SPLIT parts that sum
        # to it, precomputed per tile class (:class:`_ForwardLaunch`), replaces the window compares
        # and the rpb gather. It enters the logits as ``ident @ table`` accumulated onto q k^T: as a
        # matrix product operand it is loaded ahead through the pipeline and arrives in the
        # accumulator's layout. Masked logits get a large finite negative (0 * -inf would be NaN);
        # keys outside the map are clamped in, and masked.
        STEPS_H: tl.constexpr = (HALO_H + ROWS - 1) // ROWS
        STEP: tl.constexpr = SPLIT * TQ * ROWS * BLOCK_KW
        tile_class = tl.load(class_ptr + tl.program_id(2) * tl.num_programs(0) + tl.program_id(0))
        table = (table_ptr + n * s_table_n + tile_class * (HALO_T * STEPS_H * STEP)
                 + tl.arange(0, SPLIT * TQ)[:, None] * (ROWS * BLOCK_KW) + tl.arange(0, ROWS * BLOCK_KW)[None, :])
        ident = (tl.arange(0, TQ)[:, None] == tl.arange(0, SPLIT * TQ)[None, :] % TQ).to(table_ptr.dtype.element_ty)
    else:
        rpb_head = rpb_ptr + n * s_rn
        rel_first = _rpb_offsets_first_step(kx, kr, qt, qh, qw, halo_t, halo_h, s_rt, s_rh, s_rw, KT, KH, KW)

    # Keys outside a query's window get the logit -inf (with tables, the masked value), so exp2
    # zeroes them without a second select; m_safe keeps rows with no key yet (a max of at most
    # ``no_key_below``) at 0, which keeps their exp2 at 0, not NaN. m_i is the running max of u.
    m_i = tl.full([TQ], float("-inf"), tl.float32)
    l_i = tl.zeros([TQ], tl.float32)
    acc = tl.zeros([TQ, BLOCK_D], tl.float32)
    for a in range(0, HALO_T):
        kt = halo_t + a
        kt_c = tl.minimum(kt, len_t - 1)
        in_t = (kt >= start_t) & (kt < start_t + KT)
        for r in range(0, HALO_H, ROWS):
            ky = halo_h + r + kr
            ky_c = tl.minimum(ky, len_h - 1)
            if TABLE:
                kv_mask = d_valid[None, :]
            else:
                in_window = (in_t[:, None] & (ky[None, :] >= start_h[:, None])
                             & (ky[None, :] < start_h[:, None] + KH) & in_cols)
                kv_mask = (kx_valid & (ky < len_h) & (kt < len_t))[:, None] & d_valid[None, :]
            k_off = _offsets(b, n, kt_c, ky_c, kx_c, gt, gh, gw, DT, DH, DW, s_ib, s_it, s_ih, s_iw, s_in)
            k = tl.load(k_ptr + k_off[:, None] + offs_d[None, :] * s_id, mask=kv_mask, other=0.0)
            if TABLE:
                u = dot(ident, tl.load(table + (a * STEPS_H + r // ROWS) * STEP), IEEE, dot(q, tl.trans(k), IEEE))
            else:
                u = _logits(dot(q, tl.trans(k), IEEE), rpb_head + (rel_first + (a * s_rt + r * s_rh)), in_window,
                            HAS_RPB)
            m_new = tl.maximum(m_i, tl.max(u, axis=1))
            m_safe = tl.where(m_new <= no_key_below, 0.0, m_new)
            alpha = tl.exp2((m_i - m_safe) * _base2_unit(HAS_RPB))
            p = tl.exp2(u * _base2_unit(HAS_RPB) - (m_safe * _base2_unit(HAS_RPB))[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v_off = _offsets(b, n, kt_c, ky_c, kx_c, gt, gh, gw, DT, DH, DW, s_ib, s_it, s_ih, s_iw, s_in)
            v = tl.load(v_ptr + v_off[:, None] + offs_d[None, :] * s_id, mask=kv_mask, other=0.0)
            acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, IEEE)
            m_i = m_new
    # One reciprocal per query row, not a division per element (the epilogue's largest cost).
    out = acc * (1.0 / l_i)[:, None]
    # Base-2 log-sum-exp per query, [B, heads, T * H * W] contiguous, for the backward.
    lse_off = (b * HEADS + n) * T * H * W + ((qt * DT + gt) * H + qh * DH + gh) * W + qw * DW + gw
    tl.store(lse_ptr + lse_off, m_i * _base2_unit(HAS_RPB) + tl.log2(l_i), mask=q_valid)
    o_off = _offsets(b, n, qt, qh, qw, gt, gh, gw, DT, DH, DW, s_ob, s_ot, s_oh, s_ow, s_on)
    tl.store(out_ptr + o_off[:, None] + offs_d[None, :] * s_od, out.to(out_ptr.dtype.element_ty),
             mask=q_valid[:, None] & d_valid[None, :])


@triton.jit
def _na_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, rpb_ptr, out_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, drpb_ptr,
    s_ib, s_it, s_ih, s_iw, s_in, s_id,
    s_ob, s_ot, s_oh, s_ow, s_on, s_od,
    s_rn, s_rt, s_rh, s_rw,
    T, H, W, HEADS, HEAD_DIM, scale, RPB_SLOTS, RPB_NUMEL,
    KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    DT: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    ST: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    TILE_T: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr,
    HALO_T: tl.constexpr, HALO_H: tl.constexpr, BLOCK_KW: tl.constexpr, ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr, HAS_RPB: tl.constexpr, IEEE: tl.constexpr,
    RPB_DOT: tl.constexpr, BLOCK_R: tl.constexpr, RPB_ACC: tl.constexpr, BLOCK_RR: tl.constexpr,
    GRAD_LIKE_INPUT: tl.constexpr,
):
    # The forward's walk; per key row: P from the saved log-sum-exp, dP = dO V^T, dS = P (dP - delta).
    (gt, gh, gw, len_t, len_h, len_w, t0, h0, w0, qt, qh, qw, q_valid, b, n,
     start_t, start_h, start_w, halo_t, halo_h, halo_w) = _query_windows(
        T, H, W, HEADS, KT, KH, KW, DT, DH, DW, ST, SH, SW, TILE_T, TILE_H, TILE_W)
    TQ: tl.constexpr = TILE_T * TILE_H * TILE_W

    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < HEAD_DIM
    q_mask = q_valid[:, None] & d_valid[None, :]
    q = tl.load(q_ptr + _offsets(b, n, qt, qh, qw, gt, gh, gw, DT, DH, DW, s_ib, s_it, s_ih, s_iw, s_in)[:, None]
                + offs_d[None, :] * s_id, mask=q_mask, other=0.0)
    q = (q.to(tl.float32) * (scale * _q_unit(HAS_RPB))).to(q_ptr.dtype.element_ty)
    do = tl.load(do_ptr + _offsets(b, n, qt, qh, qw, gt, gh, gw, DT, DH, DW, s_ob, s_ot, s_oh, s_ow, s_on)[:, None]
                 + offs_d[None, :] * s_od, mask=q_mask, other=0.0)
    o = tl.load(out_ptr + _offsets(b, n, qt, qh, qw, gt, gh, gw, DT, DH, DW, s_ob, s_ot, s_oh, s_ow, s_on)[:, None]
                + offs_d[None, :] * s_od, mask=q_mask, other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
    stat_off = (b * HEADS + n) * T * H * W + ((qt * DT + gt) * H + qh * DH + gh) * W + qw * DW + gw
    tl.store(delta_ptr + stat_off, delta, mask=q_valid)
    lse = tl.load(lse_ptr + stat_off, mask=q_valid, other=0.0)

    kr, kx, kx_valid, kx_c, in_cols = _step_columns(halo_w, len_w, start_w, KW, ROWS, BLOCK_KW)
    in_cols = in_cols & q_valid[:, None]
    rel_first = _rpb_offsets_first_step(kx, kr, qt, qh, qw, halo_t, halo_h, s_rt, s_rh, s_rw, KT, KH, KW)
    rpb_first = rpb_ptr + n * s_rn + rel_first
    # This program's slot of partial rpb-gradient sums, [heads, RPB_SLOTS, RPB_NUMEL] contiguous.
    slot = (tl.program_id(0) + tl.program_id(2) * tl.num_programs(0) + b * tl.num_programs(0) * tl.num_programs(2)) % RPB_SLOTS
    drpb_base = drpb_ptr + (n * RPB_SLOTS + slot) * RPB_NUMEL
    # RPB_DOT: reduce dS over the queries of each tile row with one matmul per step (rows
    # (tile row i, key row rr) x columns rpb offset y) against a 0/1 matrix that maps (query column
    # j, key column c) to the offset c - j + const; then only [QROWS * ROWS, BLOCK_R] atomics remain.
    QROWS: tl.constexpr = TILE_T * TILE_H
    if RPB_DOT:
        jc = tl.arange(0, TILE_W * BLOCK_KW)
        y = tl.arange(0, BLOCK_R)
        col_rel = halo_w + jc % BLOCK_KW - (w0 + jc // BLOCK_KW) + KW - 1
        onehot = (col_rel[:, None] == y[None, :]).to(tl.float32)  # [TILE_W * BLOCK_KW, BLOCK_R]
        ir = tl.arange(0, QROWS * ROWS)
        row_t = t0 + (ir // ROWS) // TILE_H  # query position of each reduced row
        row_h = h0 + (ir // ROWS) % TILE_H
        row_kr = ir % ROWS
        if RPB_ACC:
            # RPB_ACC: the reduced rows are also summed into a [BLOCK_RR, BLOCK_R] register tile
            # (rows: flat (dt, dy) offset) by a second 0/1 matmul, so the walk needs no atomics and
            # the program adds its tile into its slot once at the end.
            z = tl.arange(0, BLOCK_RR)
            drpb_acc = tl.zeros([BLOCK_RR, BLOCK_R], tl.float32)

    dq = tl.zeros([TQ, BLOCK_D], tl.float32)
    for a in range(0, HALO_T):
        kt = halo_t + a
        kt_c = tl.minimum(kt, len_t - 1)
        in_t = (kt >= start_t) & (kt < start_t + KT)
        for r in range(0, HALO_H, ROWS):
            ky = halo_h + r + kr
            ky_c = tl.minimum(ky, len_h - 1)
            in_window = (in_t[:, None] & (ky[None, :] >= start_h[:, None]) & (ky[None, :] < start_h[:, None] + KH)
                         & in_cols)
            kv_mask = (kx_valid & (ky < len_h) & (kt < len_t))[:, None] & d_valid[None, :]
            k = tl.load(k_ptr + _offsets(b, n, kt_c, ky_c, kx_c, gt, gh, gw, DT, DH, DW, s_ib, s_it, s_ih, s_iw, s_in)[:, None]
                        + offs_d[None, :] * s_id, mask=kv_mask, other=0.0)
            v = tl.load(v_ptr + _offsets(b, n, kt_c, ky_c, kx_c, gt, gh, gw, DT, DH, DW, s_ib, s_it, s_ih, s_iw, s_in)[:, None]
                        + offs_d[None, :] * s_id, mask=kv_mask, other=0.0)
            step = a * s_rt + r * s_rh
            u = _logits(dot(q, tl.trans(k), IEEE), rpb_first + step, in_window, HAS_RPB)
            p = tl.exp2(u * _base2_unit(HAS_RPB) - lse[:, None])  # 0 outside the windows (-inf logits)
            dp = dot(do, tl.trans(v), IEEE)
            ds = p * (dp - delta[:, None])  # gradient of the (natural) logits
            if HAS_RPB:
                if RPB_DOT:
                    ds_rows = tl.reshape(tl.permute(tl.reshape(ds, (QROWS, TILE_W, ROWS, BLOCK_KW)), (0, 2, 1, 3)),
                                         (QROWS * ROWS, TILE_W * BLOCK_KW))
                    part = dot(ds_rows, onehot, IEEE)  # [QROWS * ROWS, BLOCK_R]
                    rt = kt - row_t + KT - 1
                    rh = halo_h + r + row_kr - row_h + KH - 1
                    row_ok = (rt >= 0) & (rt < 2 * KT - 1) & (rh >= 0) & (rh < 2 * KH - 1)
                    if RPB_ACC:
                        target = tl.where(row_ok, rt * (2 * KH - 1) + rh, -1)
                        drpb_acc += dot((z[:, None] == target[None, :]).to(tl.float32), part, IEEE)
                    else:
                        ok = row_ok[:, None] & (y < 2 * KW - 1)[None, :]
                        tl.atomic_add(drpb_base + (rt * s_rt + rh * s_rh)[:, None] + y[None, :] * s_rw, part, mask=ok)
                else:
                    tl.atomic_add(drpb_base + rel_first + step, ds, mask=in_window)
            if IEEE:
                dq += dot(ds, k.to(tl.float32), IEEE)
            else:
                dq += dot(ds.to(k.dtype), k, IEEE)
    if HAS_RPB:
        if RPB_DOT:
            if RPB_ACC:
                zt = z // (2 * KH - 1)
                zh = z % (2 * KH - 1)
                ok = (z < (2 * KT - 1) * (2 * KH - 1))[:, None] & (y < 2 * KW - 1)[None, :]
                tl.atomic_add(drpb_base + (zt * s_rt + zh * s_rh)[:, None] + y[None, :] * s_rw, drpb_acc, mask=ok)
    dq_off = _grad_offsets(b, n, qt, qh, qw, gt, gh, gw, offs_d, DT, DH, DW, s_ib, s_it, s_ih, s_iw, s_in, s_id,
                           s_ob, s_ot, s_oh, s_ow, s_on, s_od, GRAD_LIKE_INPUT)
    tl.store(dq_ptr + dq_off, (dq * scale).to(dq_ptr.dtype.element_ty), mask=q_mask)


@triton.jit
def _na_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, rpb_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    s_ib, s_it, s_ih, s_iw, s_in, s_id,
    s_ob, s_ot, s_oh, s_ow, s_on, s_od,
    s_rn, s_rt, s_rh, s_rw,
    T, H, W, HEADS, HEAD_DIM, scale,
    KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    DT: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    ST: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    TILE_T: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr, BLOCK_QW: tl.constexpr,
    SPAN_T: tl.constexpr, SPAN_H: tl.constexpr, SPAN_W: tl.constexpr,
    BLOCK_D: tl.constexpr, HAS_RPB: tl.constexpr, IEEE: tl.constexpr, GRAD_LIKE_INPUT: tl.constexpr,
):
    # Key-centric: this program's keys, against every query row of their inverse neighborhood, in
    # the transposed orientation (keys are the rows of every [TK, BLOCK_QW] block).
    gt, gh, gw, len_t, len_h, len_w = _subgrid(T, H, W, DT, DH, DW)
    t0, h0, w0, kt, kh, kw, k_valid = _tile(len_t, len_h, len_w, TILE_T, TILE_H, TILE_W)
    b = (tl.program_id(1) // HEADS).to(tl.int64)
    n = tl.program_id(1) % HEADS
    TK: tl.constexpr = TILE_T * TILE_H * TILE_W

    lo_t, hi_t = _query_range(t0, tl.minimum(t0 + TILE_T, len_t) - 1, len_t, KT, ST, SPAN_T)
    lo_h, hi_h = _query_range(h0, tl.minimum(h0 + TILE_H, len_h) - 1, len_h, KH, SH, SPAN_H)
    lo_w, hi_w = _query_range(w0, tl.minimum(w0 + TILE_W, len_w) - 1, len_w, KW, SW, SPAN_W)

    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < HEAD_DIM
    k_mask = k_valid[:, None] & d_valid[None, :]
    k = tl.load(k_ptr + _offsets(b, n, kt, kh, kw, gt, gh, gw, DT, DH, DW, s_ib, s_it, s_ih, s_iw, s_in)[:, None]
                + offs_d[None, :] * s_id, mask=k_mask, other=0.0)
    v = tl.load(v_ptr + _offsets(b, n, kt, kh, kw, gt, gh, gw, DT, DH, DW, s_ib, s_it, s_ih, s_iw, s_in)[:, None]
                + offs_d[None, :] * s_id, mask=k_mask, other=0.0)

    # The key side of the rpb offsets (the query side is subtracted per block).
    rpb_keys = rpb_ptr + (n * s_rn + (kt + KT - 1) * s_rt + (kh + KH - 1) * s_rh + (kw + KW - 1) * s_rw)

    dk = tl.zeros([TK, BLOCK_D], tl.float32)
    dv = tl.zeros([TK, BLOCK_D], tl.float32)
    for qt in range(lo_t, hi_t + 1):
        st = _window_start(qt, len_t, KT, ST)
        in_t = (kt >= st) & (kt < st + KT) & k_valid
        for qh in range(lo_h, hi_h + 1):
            sh = _window_start(qh, len_h, KH, SH)
            in_th = in_t & (kh >= sh) & (kh < sh + KH)
            for qw0 in range(lo_w, hi_w + 1, BLOCK_QW):
                qw = qw0 + tl.arange(0, BLOCK_QW)
                qw_valid = qw <= hi_w
                qw_c = tl.minimum(qw, hi_w)
                sw = _window_start(qw_c, len_w, KW, SW)
                in_window = (in_th[:, None] & (kw[:, None] >= sw[None, :]) & (kw[:, None] < sw[None, :] + KW)
                             & qw_valid[None, :])
                q_mask = qw_valid[:, None] & d_valid[None, :]
                q = tl.load(q_ptr + _offsets(b, n, qt, qh, qw_c, gt, gh, gw, DT, DH, DW, s_ib, s_it, s_ih, s_iw, s_in)[:, None]
                            + offs_d[None, :] * s_id, mask=q_mask, other=0.0)
                q = (q.to(tl.float32) * (scale * _q_unit(HAS_RPB))).to(q_ptr.dtype.element_ty)
                do = tl.load(do_ptr + _offsets(b, n, qt, qh, qw_c, gt, gh, gw, DT, DH, DW, s_ob, s_ot, s_oh, s_ow, s_on)[:, None]
                             + offs_d[None, :] * s_od, mask=q_mask, other=0.0)
                stat_off = ((b * HEADS + n) * T * H * W + ((qt * DT + gt) * H + qh * DH + gh) * W + qw_c * DW + gw)
                lse = tl.load(lse_ptr + stat_off, mask=qw_valid, other=0.0)
                delta = tl.load(delta_ptr + stat_off, mask=qw_valid, other=0.0)
                # [TK, BLOCK_QW]: the logits transposed; 0 outside the windows (-inf logits).
                u_t = _logits(dot(k, tl.trans(q), IEEE), rpb_keys[:, None] - (qt * s_rt + qh * s_rh + qw_c * s_rw)[None, :],
                              in_window, HAS_RPB)
                p_t = tl.exp2(u_t * _base2_unit(HAS_RPB) - lse[None, :])
                dp_t = dot(v, tl.trans(do), IEEE)
                ds_t = p_t * (dp_t - delta[None, :])
                if IEEE:
                    dv += dot(p_t, do.to(tl.float32), IEEE)
                    dk += dot(ds_t, q.to(tl.float32), IEEE)
                else:
                    dv += dot(p_t.to(do.dtype), do, IEEE)
                    dk += dot(ds_t.to(q.dtype), q, IEEE)
    dk = dk * (1.0 / _q_unit(HAS_RPB))  # dS is the gradient of the natural logits: dK = dS q_s / _q_unit
    g_off = _grad_offsets(b, n, kt, kh, kw, gt, gh, gw, offs_d, DT, DH, DW, s_ib, s_it, s_ih, s_iw, s_in, s_id,
                          s_ob, s_ot, s_oh, s_ow, s_on, s_od, GRAD_LIKE_INPUT)
    tl.store(dk_ptr + g_off, dk.to(dk_ptr.dtype.element_ty), mask=k_mask)
    tl.store(dv_ptr + g_off, dv.to(dv_ptr.dtype.element_ty), mask=k_mask)


# --------------------------------------------------------------------------------------------
# Host side: lifting to 3-D, launch configurations, tuning, cached launches.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LaunchConfig:
    tile: Tuple[int, int, int]
    rows: int  # key rows per step of the query-centric kernels
    num_warps: int
    num_stages: int
    # A cap on registers per thread (ptxas ``maxnreg``): more programs per SM for a few spills.
    max_registers: Optional[int] = None
    # Forward only: read each step's window mask (and rpb) from per-tile-class tables
    # (:func:`_window_index`) instead of computing it, where the tables are small enough.
    table: bool = False

    def __str__(self) -> str:
        cap = f"/m{self.max_registers}" if self.max_registers else ""
        table = "/t" if self.table else ""
        return f"{'x'.join(map(str, self.tile))}/r{self.rows}/w{self.num_warps}/s{self.num_stages}{cap}{table}"

    @classmethod
    def parse(cls, text: str) -> "LaunchConfig":
        """The config :meth:`__str__` writes: ``TxHxW/rROWS/wWARPS[/sSTAGES][/mREGISTERS][/t]``
        (stages 2 when left out), e.g. ``1x4x8/r2/w2/s3/t``."""
        match = re.fullmatch(r"(\d+)x(\d+)x(\d+)/r(\d+)/w(\d+)(?:/s(\d+))?(?:/m(\d+))?(/t)?", text)
        if match is None:
            raise ValueError(f"a launch config is TxHxW/rROWS/wWARPS[/sSTAGES][/mREGISTERS][/t], got {text!r}")
        t, h, w, rows, warps, stages, cap, table = match.groups()
        return cls((int(t), int(h), int(w)), int(rows), int(warps), int(stages or 2), int(cap) if cap else None,
                   table is not None)


# Candidates per kernel and rank, the interpreter's default first. Few on purpose: every candidate
# is a compilation (about a second) per kernel and shape class. 2-D lists from tools/tune_na.py on
# an H200 (2026-12-01, NAT-T / DiNAT-T stage shapes): 2-warp programs win everywhere; the forward
# and the key-centric kernel prefer 4x8 tiles (30% of the computed logits used at k7, 22% for
# 8x8), the dQ kernel 8x8 with 2 key rows (its rpb-gradient matmul needs >= 16 reduced rows);
# 8x16 tiles stay for k >= 13 and windows. Capped registers (tools/tune_na.py, H200,
# 2026-12-02): the 2-warp 4x8 forward at 72-88 (from 109 with rpb, 90 without; a few spills) fits
# 11-14 programs per SM instead of 9, 5-9% faster at NAT-T / DiNAT-T stage 1 (88 and 80 with rpb,
# 72 without); the key-centric kernel at 128 (from 168 / 255) 3-4% faster; the dQ kernel's caps
# (168, 128) were 10-40% slower. Window tables (``table``, tools/tune_na.py, H200, 2026-12-03,
# bf16 rpb): 12-33% faster forwards at NAT-T / DiNAT-T stage 1, DiNAT-L-384 stage 1, k13 and the
# HAT-like windows (the 8x8 tile at k13); the computed windows stay for the small NAT-T stage 3
# and were 2-5% faster without rpb. One-warp programs (tools/tune_na.py, H200, 2026-12-03 19:10 UTC):
# 4x8 tables with 3 stages 5-8% faster at NAT-T / DiNAT-T stage 1 and the windows (bf16 rpb), 2x8
# (16 queries, 8 halo rows instead of 10) 12% faster with an fp32 rpb and 2% without rpb; the 8x8
# 4-warp tables with 3 stages within 1% of the best at DiNAT-T dilation 8. Register-capped
# one-warp tables (tools/sass_na.py, offline, 2026-12-04): 4x8 at 128 registers has no spills
# and fits 13 programs per SM instead of 12. 4x8 at 104 fits 16, and 2x8 at 64 fits 30, with a
# few spills. The H100 run of 2026-12-08 tuned among them (NAT-T stage-1 forward 0.049 ms),
# but it did not record which candidate won.
_C = LaunchConfig
_CANDIDATES: Dict[str, Dict[int, List[LaunchConfig]]] = {
    "fwd": {
        1: [_C((1, 1, 64), 2, 4, 2), _C((1, 1, 64), 2, 2, 2), _C((1, 1, 128), 2, 4, 2), _C((1, 1, 64), 1, 4, 2)],
        2: [_C((1, 4, 8), 2, 2, 2, table=True), _C((1, 4, 8), 2, 2, 3, table=True),
            _C((1, 4, 8), 2, 2, 2, 72, table=True), _C((1, 8, 8), 2, 4, 2, table=True),
            _C((1, 8, 8), 2, 4, 3, table=True), _C((1, 4, 8), 2, 1, 3, table=True),
            _C((1, 2, 8), 2, 1, 3, table=True), _C((1, 4, 8), 2, 1, 3, 128, table=True),
            _C((1, 4, 8), 2, 1, 2, 104, table=True), _C((1, 2, 8), 2, 1, 2, 64, table=True),
            _C((1, 4, 8), 2, 2, 2), _C((1, 8, 8), 2, 2, 2), _C((1, 2, 8), 2, 1, 2), _C((1, 8, 8), 2, 4, 2),
            _C((1, 8, 16), 1, 4, 2), _C((1, 4, 8), 2, 2, 2, 88), _C((1, 4, 8), 2, 2, 3, 88),
            _C((1, 4, 8), 2, 2, 2, 80), _C((1, 4, 8), 2, 2, 2, 72)],
        3: [_C((2, 4, 8), 2, 4, 2), _C((2, 4, 8), 2, 2, 2), _C((1, 8, 8), 2, 4, 2), _C((2, 4, 8), 1, 4, 2)],
    },
    "bwd_dq": {
        1: [_C((1, 1, 64), 2, 4, 2), _C((1, 1, 64), 2, 2, 2), _C((1, 1, 128), 2, 4, 2), _C((1, 1, 64), 1, 4, 2)],
        2: [_C((1, 8, 8), 2, 2, 2), _C((1, 4, 8), 4, 2, 2), _C((1, 8, 8), 2, 4, 2), _C((1, 8, 16), 2, 4, 2)],
        3: [_C((2, 4, 8), 2, 4, 2), _C((2, 4, 8), 2, 2, 2), _C((1, 8, 8), 2, 4, 2), _C((2, 4, 8), 1, 4, 2)],
    },
    # The key-centric kernel walks single query rows (rows = 1).
    "bwd_dkdv": {
        1: [_C((1, 1, 64), 1, 4, 2), _C((1, 1, 64), 1, 2, 2), _C((1, 1, 128), 1, 4, 2)],
        2: [_C((1, 4, 8), 1, 2, 2), _C((1, 8, 8), 1, 2, 2), _C((1, 2, 8), 1, 2, 2), _C((1, 8, 8), 1, 4, 2),
            _C((1, 8, 16), 1, 4, 2), _C((1, 4, 8), 1, 2, 2, 128), _C((1, 8, 8), 1, 2, 2, 128)],
        3: [_C((2, 4, 8), 1, 4, 2), _C((2, 4, 8), 1, 2, 2), _C((1, 8, 8), 1, 4, 2)],
    },
}
del _C
# Tuned launches per (kernel, rank, shape class), with every candidate's milliseconds.
TUNER = Tuner()


def _pow2_at_least(x: int, floor: int = 16) -> int:
    return max(floor, 1 << max(0, math.ceil(math.log2(max(1, x)))))


def _candidates(kind: str, rank: int) -> List[LaunchConfig]:
    return _CANDIDATES[kind][rank]


def _tuned(kind: str, key: tuple, rank: int, launch: Callable[[LaunchConfig], None]) -> LaunchConfig:
    """The fastest candidate for ``key`` (timed once on the GPU), or the default when interpreting
    or when ``VISATTN_AUTOTUNE=0`` (:class:`Tuner`)."""
    return TUNER.pick((kind, rank) + key, _candidates(kind, rank), launch)


def _lift_strides(strides: Sequence[int], rank: int) -> tuple:
    """Strides of ``[B, *spatial, heads, D]`` as a ``[B, T, H, W, heads, D]`` tensor (missing axes: 0)."""
    return (strides[0],) + (0,) * (3 - rank) + tuple(strides[1:])


def _contiguous_strides(shape: Sequence[int]) -> tuple:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


def _same_strides(*tensors: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """The tensors unchanged if they share strides (q, k, v sliced from one qkv projection do),
    else contiguous copies: the kernels take one set of strides per group to keep launches cheap."""
    if all(t.stride() == tensors[0].stride() for t in tensors):
        return tensors
    return tuple(t.contiguous() for t in tensors)


def _lift_params(params: NAParams) -> Tuple[tuple, tuple, tuple]:
    pad = (1,) * (3 - len(params.spatial))
    return pad + params.kernel_size, pad + params.dilation, pad + params.stride


def _rpb_strides(rpb: torch.Tensor) -> tuple:
    """Strides of the rpb as ``[heads, 2kt-1, 2kh-1, 2kw-1]``."""
    st = rpb.stride()
    return (st[0],) + (0,) * (4 - rpb.dim()) + st[1:]


def _geometry(q_shape: Sequence[int], dtype: torch.dtype, params: NAParams, cfg: LaunchConfig) -> Tuple[tuple, dict]:
    """Grid and the constexprs every kernel takes, for ``[B, *spatial, heads, D]`` inputs."""
    rank = len(params.spatial)
    B, heads, D = q_shape[0], q_shape[-2], q_shape[-1]
    T, H, W = (1,) * (3 - rank) + tuple(params.spatial)
    (kt, kh, kw), (dt, dh, dw), (st, sh, sw) = _lift_params(params)
    tt, th, tw = cfg.tile
    tiles = math.ceil(math.ceil(T / dt) / tt) * math.ceil(math.ceil(H / dh) / th) * math.ceil(math.ceil(W / dw) / tw)
    grid = (tiles, B * heads, dt * dh * dw)
    meta = dict(KT=kt, KH=kh, KW=kw, DT=dt, DH=dh, DW=dw, ST=st, SH=sh, SW=sw, TILE_T=tt, TILE_H=th, TILE_W=tw,
                BLOCK_D=_pow2_at_least(D), IEEE=dtype == torch.float32,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if cfg.max_registers:
        meta["maxnreg"] = cfg.max_registers
    return grid, meta


@functools.lru_cache(maxsize=1024)
def _axis_extents(length: int, kernel: int, dilation: int, stride: int, tile: int) -> Tuple[int, int]:
    """Exact extents on one axis, over every tile of ``tile`` sub-grid positions of every dilation
    group: the most keys the windows of a query tile span (the query-centric walk's halo) and the
    most queries whose windows reach a key tile (the key-centric walk's range)."""
    halo = reach = 0
    for sub_len in {(length - g + dilation - 1) // dilation for g in range(dilation)}:
        starts = neighborhood_index(sub_len, kernel, 1, stride, torch.device("cpu"))[0][:, 0].tolist()
        for t0 in range(0, sub_len, tile):
            t1 = min(t0 + tile, sub_len) - 1
            halo = max(halo, starts[t1] - starts[t0] + kernel)
            # Window starts are monotone: the queries reaching [t0, t1] are those starting in (t0 - kernel, t1].
            reach = max(reach, bisect.bisect_right(starts, t1) - bisect.bisect_right(starts, t0 - kernel))
    return halo, reach


def _extents(params: NAParams, tile: Sequence[int]) -> Tuple[tuple, tuple]:
    """Per lifted axis (T, H, W): the halos and the reaches of :func:`_axis_extents`."""
    spatial = (1,) * (3 - len(params.spatial)) + tuple(params.spatial)
    axes = [_axis_extents(*args) for args in zip(spatial, *_lift_params(params), tile)]
    return tuple(a[0] for a in axes), tuple(a[1] for a in axes)


def _walk_meta(params: NAParams, cfg: LaunchConfig) -> dict:
    """Constexprs of the query-centric walk: its halo rows (T, H) and columns (W, a power of two)."""
    (halo_t, halo_h, halo_w), _ = _extents(params, cfg.tile)
    return dict(HALO_T=halo_t, HALO_H=halo_h, BLOCK_KW=_pow2_at_least(halo_w), ROWS=cfg.rows)


def _tensor_scalars(key: tuple) -> tuple:
    """The scalar arguments every kernel takes after its pointers: strides of the inputs, of the
    (contiguous) outputs and of the rpb, the lifted sizes, heads, head_dim and the logit scale."""
    params, q_shape, q_strides, _, rpb_strides = key[1:6]
    rank = len(params.spatial)
    return (*_lift_strides(q_strides, rank), *_lift_strides(_contiguous_strides(q_shape), rank),
            *(rpb_strides or (0, 0, 0, 0)), *((1,) * (3 - rank) + tuple(params.spatial)),
            q_shape[-2], q_shape[-1], params.scale)


def _np_window_start(pos: np.ndarray, sub_len: int, kernel: int, stride: int) -> np.ndarray:
    """:func:`_window_start` on the host."""
    leader = np.minimum((pos // stride) * stride + stride // 2, sub_len - 1)
    return np.minimum(np.maximum(leader - kernel // 2, 0), sub_len - kernel)


def _axis_windows(sub_len: int, kernel: int, stride: int, tile: int, extent: int,
                  index: int) -> Tuple[np.ndarray, np.ndarray]:
    """The windows of tile ``index`` on one sub-grid axis, as the query-centric walk sees them:
    ``[tile, extent]`` whether halo position ``p`` lies in query ``j``'s window, and the rpb
    offset ``key - query + kernel - 1`` there (0 elsewhere). Queries past the axis are clamped
    onto its last one, as in :func:`_tile`."""
    t0 = index * tile
    query = np.minimum(t0 + np.arange(tile), sub_len - 1)
    start = _np_window_start(query, sub_len, kernel, stride)
    key = _np_window_start(np.array(t0), sub_len, kernel, stride) + np.arange(extent)
    valid = (key[None, :] < sub_len) & (key[None, :] >= start[:, None]) & (key[None, :] < start[:, None] + kernel)
    return valid, np.where(valid, key[None, :] - query[:, None] + kernel - 1, 0)


@functools.lru_cache(maxsize=64)
def _window_index(params: NAParams, cfg: LaunchConfig,
                  max_elements: int) -> Optional[Tuple[np.ndarray, np.ndarray, int]]:
    """The forward's window tables for ``cfg``'s walk, or ``None`` when they would exceed
    ``max_elements`` per head.

    Programs whose tiles see the same windows (on each axis: the same positions of every query's
    window in the halo, and the same rpb offsets there; in the interior of a map that is all of
    them) share a tile class. Returns ``(index, classes, table_elements)``: ``index``
    ``[n_classes, HALO_T, steps_h, TQ, ROWS * BLOCK_KW]`` (int32) is each logit's flat offset in
    one head's ``[2kt - 1, 2kh - 1, 2kw - 1]`` rpb, -1 outside its query's window; ``classes``
    ``[dilation groups, grid[0]]`` (int32) the class of each program.
    """
    walk = _walk_meta(params, cfg)
    spatial = (1,) * (3 - len(params.spatial)) + tuple(params.spatial)
    kernels, dilations, strides = _lift_params(params)
    rows = walk["ROWS"]
    steps_h = triton.cdiv(walk["HALO_H"], rows)
    extents = (walk["HALO_T"], steps_h * rows, walk["BLOCK_KW"])
    grid0 = math.prod(triton.cdiv(triton.cdiv(n, d), t) for n, d, t in zip(spatial, dilations, cfg.tile))
    axis_classes: List[Dict[bytes, int]] = [{}, {}, {}]
    axis_windows: List[List[Tuple[np.ndarray, np.ndarray]]] = [[], [], []]

    def axis_class(axis: int, sub_len: int, index: int) -> int:
        windows = _axis_windows(sub_len, kernels[axis], strides[axis], cfg.tile[axis], extents[axis], index)
        desc = windows[0].tobytes() + windows[1].tobytes()
        if desc not in axis_classes[axis]:
            axis_classes[axis][desc] = len(axis_windows[axis])
            axis_windows[axis].append(windows)
        return axis_classes[axis][desc]

    triples: Dict[Tuple[int, int, int], int] = {}
    classes = []
    pid = np.arange(grid0)
    for group in np.ndindex(*dilations):
        sub = [triton.cdiv(n - g, d) for n, g, d in zip(spatial, group, dilations)]
        tiles = [triton.cdiv(n, t) for n, t in zip(sub, cfg.tile)]
        # This group's tile index per axis of every program (as :func:`_tile` splits grid[0]),
        # and each axis's classes per tile index: one window computation per axis tile.
        tile_index = (pid // (tiles[1] * tiles[2]), (pid // tiles[2]) % tiles[1], pid % tiles[2])
        per_axis = [np.array([axis_class(axis, sub[axis], int(i)) for i in range(int(tile_index[axis].max()) + 1)])
                    for axis in range(3)]
        combos = zip(*(per_axis[axis][tile_index[axis]].tolist() for axis in range(3)))
        classes.append([triples.setdefault(combo, len(triples)) for combo in combos])
    tq, rb = math.prod(cfg.tile), rows * walk["BLOCK_KW"]
    elements = len(triples) * extents[0] * steps_h * tq * rb
    if elements > max_elements:
        return None
    widths = [2 * k - 1 for k in kernels]
    index = np.empty((len(triples), extents[0], steps_h, tq, rb), dtype=np.int32)
    for (ct, ch, cw), c in triples.items():
        (vt, rt), (vh, rh), (vw, rw) = axis_windows[0][ct], axis_windows[1][ch], axis_windows[2][cw]
        valid = vt[:, None, None, :, None, None] & vh[None, :, None, None, :, None] & vw[None, None, :, None, None, :]
        flat = ((rt[:, None, None, :, None, None] * widths[1] + rh[None, :, None, None, :, None]) * widths[2]
                + rw[None, None, :, None, None, :])
        table = np.where(valid, flat, -1).reshape(tq, extents[0], steps_h, rows, extents[2])
        index[c] = table.transpose(1, 2, 0, 3, 4).reshape(extents[0], steps_h, tq, rb)
    return index, np.asarray(classes, dtype=np.int32), elements


# The masked entries of a window table: a large finite negative, so that the table's matrix
# product with the 0/1 identity stays finite (0 * -inf is NaN). A row whose running max is at most
# half of it has had no key of its window yet, and the forward treats it as a row of -inf: were
# the max subtracted from such logits, the exp2 argument u * c - m * c of the rpb path would keep
# m * c's rounding error (~1e23 at -1e30: exp2 -> inf, then NaN; seen on the GPU, bf16 with rpb).
_MASKED = {torch.float16: -2.0 ** 15, torch.bfloat16: -2.0 ** 100, torch.float32: -2.0 ** 100}


@triton.jit
def _window_table_kernel(rpb_ptr, index_ptr, table_ptr, s_rn, s_rt, s_rh, s_rw, numel, masked,
                         WIDTH_H: tl.constexpr, WIDTH_W: tl.constexpr, STEP: tl.constexpr, SPLIT: tl.constexpr,
                         BLOCK: tl.constexpr):
    """The rpb window table of head ``program_id(1)``: entry ``i`` of ``index`` (blocks of ``STEP``)
    is ``rpb[n].flatten()[index[i]]`` (rpb ``[heads, 2kt - 1, WIDTH_H, WIDTH_W]``, any strides), or
    ``masked`` where ``index[i] < 0``, written in SPLIT parts of the table's dtype that sum to it
    (the second: what the first rounded off)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    in_range = offs < numel
    index = tl.load(index_ptr + offs, mask=in_range, other=-1)
    rel = ((index // (WIDTH_H * WIDTH_W)) * s_rt + ((index // WIDTH_W) % WIDTH_H) * s_rh
           + (index % WIDTH_W) * s_rw)
    value = tl.load(rpb_ptr + tl.program_id(1) * s_rn + rel, mask=index >= 0, other=0.0).to(tl.float32)
    head = table_ptr + tl.program_id(1) * numel * SPLIT + (offs // STEP) * (SPLIT * STEP) + offs % STEP
    high = tl.where(index >= 0, value, masked).to(table_ptr.dtype.element_ty)
    tl.store(head, high, mask=in_range)
    if SPLIT == 2:
        low = tl.where(index >= 0, value - high.to(tl.float32), 0.0)
        tl.store(head + STEP, low.to(table_ptr.dtype.element_ty), mask=in_range)


class _ForwardLaunch:
    """The forward's launches for one call signature: the kernel and, when it reads window tables,
    their tile classes and, with rpb, the index of the rpb table (expanded per call by one small
    launch), without it the mask table. Tables are in q's dtype; an rpb of another dtype is split
    into two parts of it, which keep 16 bits of its mantissa (all of an fp16 rpb's)."""

    def __init__(self, key: tuple, cfg: LaunchConfig):
        params, q_shape, _, dtype, rpb_strides = key[1:6]
        rpb_dtype = key[8]
        device = torch.device(key[6])
        grid, meta = _geometry(q_shape, dtype, params, cfg)
        meta.update(_walk_meta(params, cfg), HAS_RPB=rpb_strides is not None)
        windows = _window_index(params, cfg, _TABLE_MAX) if cfg.table else None
        split = 2 if rpb_strides is not None and rpb_dtype != dtype and dtype != torch.float32 else 1
        meta.update(TABLE=windows is not None, SPLIT=split)
        self.heads, self.dtype, self.split, self.table_elements = q_shape[-2], dtype, split, 0
        self.classes = self.index = self.mask = self.expand = None
        s_table_n = 0
        if windows is not None:
            index, classes, self.table_elements = windows
            self.classes = torch.from_numpy(classes).to(device)
            self.index = torch.from_numpy(index.reshape(-1)).to(device)
            if rpb_strides is None:
                self.mask = torch.zeros(self.index.shape, dtype=dtype, device=device).masked_fill_(
                    self.index < 0, _MASKED[dtype])
            else:
                s_table_n = split * self.table_elements
                block = 1024
                self.expand = KernelCall(
                    _window_table_kernel, (triton.cdiv(self.table_elements, block), self.heads),
                    (*rpb_strides, self.table_elements, _MASKED[dtype]),
                    dict(WIDTH_H=2 * meta["KH"] - 1, WIDTH_W=2 * meta["KW"] - 1, STEP=index[0, 0, 0].size,
                         SPLIT=split, BLOCK=block))
        no_key_below = _MASKED[dtype] / 2 if windows is not None else float("-inf")
        self.call = KernelCall(_na_fwd_kernel, grid, _tensor_scalars(key) + (s_table_n, no_key_below), meta)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rpb: Optional[torch.Tensor],
                 out: torch.Tensor, lse: torch.Tensor) -> None:
        if self.classes is None:
            self.call(q, k, v, rpb if rpb is not None else q, out, lse, q, q)
        elif rpb is None:
            self.call(q, k, v, q, out, lse, self.mask, self.classes)
        else:
            table = torch.empty((self.heads, self.split * self.table_elements), dtype=self.dtype, device=q.device)
            self.expand(rpb, self.index, table)
            self.call(q, k, v, rpb, out, lse, table, self.classes)


def _bwd_calls(key: tuple, cfg_dq: LaunchConfig, cfg_dkdv: LaunchConfig) -> Tuple[KernelCall, KernelCall]:
    params, q_shape, _, dtype, rpb_strides = key[1:6]
    grad_like_input = key[7]
    tensor_scalars = _tensor_scalars(key)
    has_rpb = rpb_strides is not None
    rpb_numel = math.prod(2 * k - 1 for k in params.kernel_size) if has_rpb else 1

    grid, meta = _geometry(q_shape, dtype, params, cfg_dq)
    rpb_dot = has_rpb and cfg_dq.tile[0] * cfg_dq.tile[1] * cfg_dq.rows >= 16
    block_r = _pow2_at_least(2 * meta["KW"] - 1)
    block_rr = _pow2_at_least((2 * meta["KT"] - 1) * (2 * meta["KH"] - 1))
    meta.update(_walk_meta(params, cfg_dq), HAS_RPB=has_rpb, RPB_DOT=rpb_dot, BLOCK_R=block_r,
                # The register tile of the rpb gradient, where it fits (rows: every (dt, dy) offset).
                RPB_ACC=rpb_dot and block_rr * block_r <= _RPB_ACC_MAX, BLOCK_RR=block_rr,
                GRAD_LIKE_INPUT=grad_like_input)
    dq = KernelCall(_na_bwd_dq_kernel, grid, tensor_scalars + (_RPB_SLOTS, rpb_numel), meta)

    grid, meta = _geometry(q_shape, dtype, params, cfg_dkdv)
    _, (_, _, reach_w) = _extents(params, cfg_dkdv.tile)
    spans = {f"SPAN_{axis}": _pow2_at_least(tile + 2 * (meta[f"K{axis}"] + meta[f"S{axis}"]))
             for axis, tile in zip("THW", cfg_dkdv.tile)}
    meta.update(BLOCK_QW=_pow2_at_least(reach_w), HAS_RPB=has_rpb, GRAD_LIKE_INPUT=grad_like_input, **spans)
    return dq, KernelCall(_na_bwd_dkdv_kernel, grid, tensor_scalars, meta)


def _shape_class(params: NAParams, q_shape: Sequence[int], dtype: torch.dtype,
                 rpb_dtype: Optional[torch.dtype]) -> tuple:
    # Size buckets (powers of two of the token count and of the batch x heads) keep tuning per class.
    # The rpb's dtype (None: no rpb) too: an fp32 rpb under bf16 q doubles the window tables, and
    # the fastest forward differs (tools/tune_na.py, H200, 2026-12-03: 2x8 tiles, not 4x8).
    return (_lift_params(params), q_shape[-1], dtype, rpb_dtype, math.prod(params.spatial).bit_length(),
            (q_shape[0] * q_shape[-2]).bit_length())


# The launches of each call signature (the forward's, the backward's pair).
_CALLS = CallCache()


def _call_key(kind: str, params: NAParams, q: torch.Tensor, rpb: Optional[torch.Tensor],
              grad_like_input: bool = False) -> tuple:
    """What fixes a call's launches: ``(kind, params, q's shape, strides and dtype, the rpb's
    strides, the device, whether the backward writes its gradients in the inputs' layout, the
    rpb's dtype)``."""
    return (kind, params, tuple(q.shape), q.stride(), q.dtype, None if rpb is None else _rpb_strides(rpb), q.device,
            grad_like_input, None if rpb is None else rpb.dtype)


def na_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, params: NAParams,
               rpb: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fused forward on ``[B, *spatial, heads, D]`` (any strides).

    Returns the output (contiguous, input dtype) and the base-2 log-sum-exp ``[B, heads, N]`` (fp32).
    """
    q, k, v = _same_strides(q, k, v)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((q.shape[0], params.heads, math.prod(params.spatial)), dtype=torch.float32, device=q.device)
    tensors = (q, k, v, rpb, out, lse)
    key = _call_key("fwd", params, q, rpb)

    def build() -> _ForwardLaunch:
        launches: Dict[LaunchConfig, _ForwardLaunch] = {}  # built once per candidate: tables go to the GPU

        def launch(cfg: LaunchConfig) -> None:
            if cfg not in launches:
                launches[cfg] = _ForwardLaunch(key, cfg)
            launches[cfg](*tensors)

        shape_class = _shape_class(params, q.shape, q.dtype, None if rpb is None else rpb.dtype)
        cfg = _tuned("fwd", shape_class, len(params.spatial), launch)
        return launches.get(cfg) or _ForwardLaunch(key, cfg)

    _CALLS.get(key, build)(*tensors)
    return out, lse


def na_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                rpb: Optional[torch.Tensor], out: torch.Tensor, lse: torch.Tensor, params: NAParams,
                grad_qkv: Optional[torch.Tensor] = None,
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Fused backward: ``(dq, dk, dv, drpb)`` in the inputs' dtypes (accumulated in fp32).

    Without ``grad_qkv`` the gradients are new contiguous tensors. With it (q, k, v being the
    ``unbind(-3)`` slices of one packed ``[B, *spatial, 3, heads, D]`` tensor, and ``grad_qkv`` a
    tensor of the same shape and strides) the kernels write them into its slices, which are returned.
    """
    q, k, v = _same_strides(q, k, v)
    grad_out = grad_out if grad_out.stride() == out.stride() else grad_out.contiguous()  # out is contiguous
    if grad_qkv is not None:
        dq, dk, dv = grad_qkv.unbind(-3)
        if dq.stride() != q.stride():
            raise ValueError(f"grad_qkv's slices must have q's strides {q.stride()}, got {dq.stride()}")
    else:
        dq, dk, dv = (torch.empty(out.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    delta = torch.empty_like(lse)
    rpb_c = rpb.contiguous() if rpb is not None else None  # its strides index the scratch too
    rpb_numel = rpb_c[0].numel() if rpb is not None else 1
    # fp32 partial sums of the rpb gradient, [heads, slots, prod(2k - 1)] (without rpb an unread
    # placeholder of the same dtype, so both cases share one compiled signature).
    scratch = (torch.zeros((params.heads, _RPB_SLOTS, rpb_numel), dtype=torch.float32, device=q.device)
               if rpb is not None else lse)
    dq_tensors = (q, k, v, rpb_c if rpb is not None else q, out, grad_out, lse, delta, dq, scratch)
    dkdv_tensors = (q, k, v, rpb_c if rpb is not None else q, grad_out, lse, delta, dk, dv)
    key = _call_key("bwd", params, q, rpb_c, grad_like_input=grad_qkv is not None)

    def build() -> Tuple[KernelCall, KernelCall]:
        shape_class = _shape_class(params, q.shape, q.dtype, None if rpb is None else rpb.dtype)
        rank, default = len(params.spatial), _candidates("bwd_dkdv", len(params.spatial))[0]

        def launch_dq(cfg: LaunchConfig) -> None:
            if rpb is not None:
                scratch.zero_()
            _bwd_calls(key, cfg, default)[0](*dq_tensors)

        cfg_dq = _tuned("bwd_dq", shape_class, rank, launch_dq)
        launch_dq(cfg_dq)  # delta, which the key-centric kernel reads, for its tuning
        cfg_dkdv = _tuned("bwd_dkdv", shape_class, rank, lambda cfg: _bwd_calls(key, cfg_dq, cfg)[1](*dkdv_tensors))
        if rpb is not None:
            scratch.zero_()
        return _bwd_calls(key, cfg_dq, cfg_dkdv)

    dq_call, dkdv_call = _CALLS.get(key, build)
    dq_call(*dq_tensors)  # also writes delta
    dkdv_call(*dkdv_tensors)
    drpb = scratch.sum(1).view(rpb.shape).to(rpb.dtype) if rpb is not None else None
    return dq, dk, dv, drpb


# --------------------------------------------------------------------------------------------
# The op. Eager calls go through a plain autograd.Function (a custom op's eager dispatch costs
# about 0.7 ms of CPU per call in torch 2.11, more than the kernels at model sizes); traced calls
# (torch.compile) go through custom ops with fake implementations, which the compiler treats as
# opaque nodes.
# --------------------------------------------------------------------------------------------


def _params(q: torch.Tensor, kernel_size: Sequence[int], dilation: Sequence[int], stride: Sequence[int],
            scale: float) -> NAParams:
    rank = q.dim() - 3
    return NAParams(tuple(q.shape[1:1 + rank]), tuple(kernel_size), tuple(dilation), tuple(stride),
                    q.shape[-2], q.shape[-1], scale)


@torch.library.custom_op("visattn::na_forward", mutates_args=())
def _na_forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rpb: Optional[torch.Tensor],
                   kernel_size: List[int], dilation: List[int], stride: List[int],
                   scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    return na_forward(q, k, v, _params(q, kernel_size, dilation, stride, scale), rpb)


@_na_forward_op.register_fake
def _(q, k, v, rpb, kernel_size, dilation, stride, scale):
    return q.new_empty(q.shape), q.new_empty((q.shape[0], q.shape[-2], math.prod(q.shape[1:-2])), dtype=torch.float32)


@torch.library.custom_op("visattn::na_backward", mutates_args=())
def _na_backward_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    rpb: Optional[torch.Tensor], out: torch.Tensor, lse: torch.Tensor, kernel_size: List[int],
                    dilation: List[int], stride: List[int],
                    scale: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv, drpb = na_backward(grad_out, q, k, v, rpb, out, lse, _params(q, kernel_size, dilation, stride, scale))
    return dq, dk, dv, (drpb if drpb is not None else q.new_empty(0))


@_na_backward_op.register_fake
def _(grad_out, q, k, v, rpb, out, lse, kernel_size, dilation, stride, scale):
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            torch.empty_like(rpb) if rpb is not None else q.new_empty(0))


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, rpb, kernel_size, dilation, stride, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, rpb, out, lse)
    ctx.config = (kernel_size, dilation, stride, scale)
    ctx.has_rpb = rpb is not None


def _backward(ctx, grad_out, grad_lse):
    q, k, v, rpb, out, lse = ctx.saved_tensors
    dq, dk, dv, drpb = _na_backward_op(grad_out, q, k, v, rpb, out, lse, *ctx.config)
    return dq, dk, dv, (drpb if ctx.has_rpb else None), None, None, None, None


torch.library.register_autograd("visattn::na_forward", _backward, setup_context=_setup_context)


class _NATriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, rpb, params):
        out, lse = na_forward(q, k, v, params, rpb)
        ctx.save_for_backward(q, k, v, rpb, out, lse)
        ctx.params = params
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, rpb, out, lse = ctx.saved_tensors
        dq, dk, dv, drpb = na_backward(grad_out, q, k, v, rpb, out, lse, ctx.params)
        return dq, dk, dv, drpb, None


def _refuse_unsupported(q: torch.Tensor, v: torch.Tensor) -> None:
    reason = unsupported_reason(q, v)
    if reason is not None:
        raise ValueError(f"the triton neighborhood-attention backend does not support {reason}")


def na_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, params: NAParams,
              rpb: Optional[torch.Tensor]) -> torch.Tensor:
    """The ``"triton"`` backend (1-D, 2-D and 3-D); raises ``ValueError`` for calls it cannot run."""
    _refuse_unsupported(q, v)
    if torch.compiler.is_compiling():
        out, _ = _na_forward_op(q, k, v, rpb, list(params.kernel_size), list(params.dilation),
                                list(params.stride), params.scale)
        return out
    return _NATriton.apply(q, k, v, rpb, params)


class _NATritonPacked(torch.autograd.Function):
    # q, k, v as slices of one packed tensor: its gradient is written by the kernels in place of
    # three tensors that autograd would stack into it (a copy of all three, and their memory).
    @staticmethod
    def forward(ctx, qkv, rpb, params):
        out, lse = na_forward(*qkv.unbind(-3), params, rpb)
        ctx.save_for_backward(qkv, rpb, out, lse)
        ctx.params = params
        return out

    @staticmethod
    def backward(ctx, grad_out):
        qkv, rpb, out, lse = ctx.saved_tensors
        grad_qkv, drpb = na_packed_backward(grad_out, qkv, rpb, out, lse, ctx.params)
        return grad_qkv, drpb, None


def na_packed_backward(grad_out: torch.Tensor, qkv: torch.Tensor, rpb: Optional[torch.Tensor], out: torch.Tensor,
                       lse: torch.Tensor, params: NAParams) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """:func:`na_backward` for a packed ``[B, *spatial, 3, heads, D]`` qkv whose slices were the
    forward's q, k, v: ``(grad_qkv, drpb)``, the kernels writing ``grad_qkv`` in qkv's layout."""
    grad_qkv = torch.empty_like(qkv)
    if grad_qkv.stride() == qkv.stride():
        _, _, _, drpb = na_backward(grad_out, *qkv.unbind(-3), rpb, out, lse, params, grad_qkv)
    else:  # a layout empty_like cannot reproduce (overlapping or gapped views)
        dq, dk, dv, drpb = na_backward(grad_out, *qkv.unbind(-3), rpb, out, lse, params)
        grad_qkv = torch.stack((dq, dk, dv), dim=-3)
    return grad_qkv, drpb


def na_triton_packed(qkv: torch.Tensor, params: NAParams, rpb: Optional[torch.Tensor]) -> torch.Tensor:
    """The ``"triton"`` backend on a packed ``[B, *spatial, 3, heads, D]`` qkv; as :func:`na_triton`
    on its ``unbind(-3)`` slices, with the gradient written as one packed tensor."""
    if torch.compiler.is_compiling():  # the traced graph stacks the three gradients itself
        return na_triton(*qkv.unbind(-3), params, rpb)
    _refuse_unsupported(qkv, qkv)  # the slices' dtype, device and head_dim are qkv's
    return _NATritonPacked.apply(qkv, rpb, params)
