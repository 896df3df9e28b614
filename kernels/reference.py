"""Pure-PyTorch neighborhood attention: the numerical reference of every other backend.

Semantics (NATTEN 0.14/0.15 for kernel/dilation/rpb, NATTEN >= 0.20 for stride), per spatial axis
of length ``L`` with kernel ``k``, dilation ``d`` and stride ``s``:

* the axis splits into ``d`` interleaved sub-grids ``{p : p % d == g}``; a query only sees keys of
  its own sub-grid, whose length is ``L_g = ceil((L - g) / d)``;
* inside the sub-grid, with ``i = p // d``, queries are grouped by ``s``; the group's leader is its
  centre query ``min((i // s) * s + s // 2, L_g - 1)`` and the window is the ``k`` sub-grid
  positions centred on the leader, shifted to stay inside ``[0, L_g)``;
* the logit is ``scale * q . k + rpb[h, (key_i - i) + k - 1, ...]`` (offsets in sub-grid units).

The implementation gathers each query's ``k1 * k2 * ...`` keys and values, so it needs
``O(N * prod(k) * D)`` memory (never ``N x N``); queries are processed in slabs along the first
spatial axis so that one slab's gathered keys stay under a fixed element budget.
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch

from ._checks import NAParams

# Gathered K (and V) elements per slab: 2**25 fp32 elements = 128 MiB each.
_SLAB_ELEMENTS = 1 << 25


def neighborhood_index(
    length: int, kernel_size: int, dilation: int, stride: int, device: torch.device
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Key positions and rpb offsets of every query along one axis.

    Returns ``(keys, rel)``, both int64 ``[length, kernel_size]``: ``keys[p, t]`` is the position
    of query ``p``'s ``t``-th key; ``rel[p, t]`` indexes the rpb axis of size ``2k - 1``.
    """
    pos = torch.arange(length, device=device)
    group = pos % dilation
    sub_pos = pos // dilation
    sub_len = (length - group + dilation - 1) // dilation
    leader = torch.minimum((sub_pos // stride) * stride + stride // 2, sub_len - 1)
    start = torch.minimum((leader - kernel_size // 2).clamp_min(0), sub_len - kernel_size)
    sub_keys = start[:, None] + torch.arange(kernel_size, device=device)
    keys = sub_keys * dilation + group[:, None]
    rel = sub_keys - sub_pos[:, None] + (kernel_size - 1)
    return keys, rel


def _flat_index(per_axis: List[torch.Tensor], sizes: Tuple[int, ...]) -> torch.Tensor:
    """Combine per-axis ``[L_a, k_a]`` indices into row-major flat indices ``[prod(L), prod(k)]``
    over a grid of shape ``sizes``."""
    ndim = len(per_axis)
    flat = None
    for axis, index in enumerate(per_axis):
        shape = [1] * (2 * ndim)
        shape[axis], shape[ndim + axis] = index.shape
        term = index.view(shape) * math.prod(sizes[axis + 1 :])
        flat = term if flat is None else flat + term
    n_query = math.prod([i.shape[0] for i in per_axis])
    return flat.reshape(n_query, -1)


def na_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    params: NAParams,
    rpb: Optional[torch.Tensor],
) -> torch.Tensor:
    """Neighborhood attention on heads-last ``[B, *spatial, heads, D]`` tensors.

    Neighbours are fetched with ``index_select`` on the flattened token axis, whose backward is an
    ``index_add`` (far faster on CPU than the scatter of advanced indexing).
    Half-precision inputs are computed in float32 and the result cast back to the input dtype.
    """
    out_dtype = q.dtype
    compute_dtype = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    q, k, v = (t.to(compute_dtype) for t in (q, k, v))
    if rpb is not None:
        rpb = rpb.to(compute_dtype)

    indices = [
        neighborhood_index(length, ks, d, s, q.device)
        for length, ks, d, s in zip(params.spatial, params.kernel_size, params.dilation, params.stride)
    ]
    batch, heads, head_dim, v_dim = q.shape[0], params.heads, params.head_dim, v.shape[-1]
    window = math.prod(params.kernel_size)
    n_tokens = math.prod(params.spatial)
    rel_sizes = tuple(2 * ks - 1 for ks in params.kernel_size)
    rest = math.prod(params.spatial[1:])
    rows = max(1, _SLAB_ELEMENTS // max(1, batch * rest * window * heads * max(head_dim, v_dim)))

    k_tokens = k.reshape(batch, n_tokens, heads, head_dim)
    v_tokens = v.reshape(batch, n_tokens, heads, v_dim)
    rpb_flat = rpb.flatten(1) if rpb is not None else None
    slabs: List[torch.Tensor] = []
    for row0 in range(0, params.spatial[0], rows):
        row1 = min(row0 + rows, params.spatial[0])
        keys = _flat_index([indices[0][0][row0:row1]] + [kk for kk, _ in indices[1:]], params.spatial)
        n_query = keys.shape[0]
        k_nbr = k_tokens.index_select(1, keys.view(-1)).view(batch, n_query, window, heads, head_dim)
        v_nbr = v_tokens.index_select(1, keys.view(-1)).view(batch, n_query, window, heads, v_dim)
        q_slab = q[:, row0:row1].reshape(batch, n_query, heads, head_dim)
        logits = torch.einsum("bqhd,bqnhd->bqhn", q_slab * params.scale, k_nbr)
        if rpb_flat is not None:
            rel = _flat_index([indices[0][1][row0:row1]] + [r for _, r in indices[1:]], rel_sizes)
            bias = rpb_flat.index_select(1, rel.view(-1)).view(heads, n_query, window)
            logits = logits + bias.permute(1, 0, 2)
        attn = logits.softmax(dim=-1)
        out = torch.einsum("bqhn,bqnhd->bqhd", attn, v_nbr)
        slabs.append(out.reshape((batch, row1 - row0) + params.spatial[1:] + (heads, v_dim)))
    return torch.cat(slabs, dim=1).to(out_dtype)
