"""A faithful PyTorch port of the official bi-level routing attention: the baseline of ``visattn bench routed``.

This is a benchmark baseline, not a visattn layer. It computes what ``ops/bra_legacy.py`` of
https://github.com/rayleizhu/BiFormer (the module of the released checkpoints) computes, the way
it does, with the einops ``rearrange`` calls written as the reshapes / permutes they perform (a
copy exactly where einops makes one):

* the NHWC map is cut into ``n_win x n_win`` windows (a copy) *before* the ``qkv`` projection,
  which returns ``q`` and ``kv`` as slices of one tensor;
* region descriptors are the window means of ``q`` and ``k``; the router takes the detached means,
  ``(q * scale) @ k^T``, ``torch.topk`` and a softmax of the top-k logits (the routing weights,
  computed and unused with the released ``mul_weight='none'``);
* LePE: the ``v`` slice rearranged back to an NCHW map, made contiguous, a depthwise conv;
* ``KVGather``: ``torch.gather`` of the ``kv`` windows (``topk`` copies per query window);
* per-window multi-head attention as explicit ``(q * scale) @ k``, softmax, ``@ v`` on the
  rearranged (copied) q / k / v, the output rearranged back to the map, ``+ lepe``, ``wo``;
* ``auto_pad``: right/bottom zero padding of the input and a crop of the output.

Module names are the official ones (``qkv.qkv``, ``lepe``, ``wo``), so an official block's
``attn.*`` weights load with ``load_state_dict``; :meth:`OfficialBRAPort.from_visattn` copies a
visattn :class:`~visattn.layers.BiLevelRoutingAttention`'s weights over. Deviation, which changes
no number: only the released configuration (``kv_downsample_mode='identity'``,
``param_attention='qkvo'``, no routing parameters, non-differentiable hard routing).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from visattn.layers import BiLevelRoutingAttention

__all__ = ["OfficialBRAPort"]


class _QKVLinear(nn.Module):
    """``QKVLinear``: one projection, returned as the ``q`` and ``kv`` slices."""

    def __init__(self, dim: int, qk_dim: int):
        super().__init__()
        self.qk_dim = qk_dim
        self.qkv = nn.Linear(dim, 2 * qk_dim + dim)

    def forward(self, x: torch.Tensor):
        q, kv = self.qkv(x).split([self.qk_dim, self.qkv.out_features - self.qk_dim], dim=-1)
        return q, kv


class OfficialBRAPort(nn.Module):
    """The official ``BiLevelRoutingAttention`` (released configuration). Input / output ``[B, H, W, dim]``."""

    def __init__(self, dim: int, num_heads: int, n_win: int, qk_dim: int, topk: int, side_dwconv: int = 5,
                 auto_pad: bool = False):
        super().__init__()
        self.dim, self.num_heads, self.n_win, self.qk_dim, self.topk = dim, num_heads, n_win, qk_dim, topk
        self.scale = qk_dim ** -0.5
        self.auto_pad = auto_pad
        self.lepe = nn.Conv2d(dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim)
        self.qkv = _QKVLinear(dim, qk_dim)
        self.wo = nn.Linear(dim, dim)

    @classmethod
    def from_visattn(cls, layer: BiLevelRoutingAttention) -> "OfficialBRAPort":
        """The port with ``layer``'s weights, on its device and dtype."""
        dim = layer.wo.in_features
        port = cls(dim, layer.num_heads, layer.n_win, layer.qk_dim, layer.topk, layer.lepe.kernel_size[0],
                   layer.auto_pad)
        state = {("qkv." + k if k.startswith("qkv.") else k): v for k, v in layer.state_dict().items()}
        port.load_state_dict(state)
        return port.to(device=layer.wo.weight.device, dtype=layer.wo.weight.dtype)

    def _route(self, q_win: torch.Tensor, k_win: torch.Tensor):
        # TopkRouting with diff_routing=False and no emb: detached means, softmax of the top-k logits.
        logits = (q_win.detach() * self.scale) @ k_win.detach().transpose(-2, -1)
        topk_logits, topk_index = torch.topk(logits, k=self.topk, dim=-1)
        return topk_logits.softmax(dim=-1), topk_index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, H_in, W_in, C = x.shape
        j = i = self.n_win
        pad_r, pad_b = (j - W_in % j) % j, (j - H_in % j) % j
        if self.auto_pad:
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        elif pad_r or pad_b:
            raise ValueError(f"OfficialBRAPort: {H_in}x{W_in} is not divisible by n_win={self.n_win}")
        H, W = x.shape[1:3]
        h, w = H // j, W // i
        p2, w2, m = j * i, h * w, self.num_heads

        # "n (j h) (i w) c -> n (j i) h w c"
        x = x.reshape(N, j, h, i, w, C).permute(0, 1, 3, 2, 4, 5).reshape(N, p2, h, w, C)
        q, kv = self.qkv(x)
        q_pix = q.reshape(N, p2, w2, self.qk_dim)
        # kv_down is the identity: "n p2 h w c -> (n p2) c h w" and back to "n (j i) (h w) c"
        kv_pix = kv.reshape(N * p2, h, w, -1).permute(0, 3, 1, 2)
        kv_pix = kv_pix.reshape(N, p2, -1, h, w).permute(0, 1, 3, 4, 2).reshape(N, p2, w2, -1)
        q_win, k_win = q.mean([2, 3]), kv[..., :self.qk_dim].mean([2, 3])

        # LePE: "n (j i) h w c -> n c (j h) (i w)", contiguous, conv, back to NHWC (a view)
        v_map = kv[..., self.qk_dim:].reshape(N, j, i, h, w, C).permute(0, 5, 1, 3, 2, 4).reshape(N, C, H, W)
        lepe = self.lepe(v_map.contiguous()).permute(0, 2, 3, 1)

        _, r_idx = self._route(q_win, k_win)
        c_kv = kv_pix.shape[-1]
        topk_kv = torch.gather(kv_pix.view(N, 1, p2, w2, c_kv).expand(-1, p2, -1, -1, -1), dim=2,
                               index=r_idx.view(N, p2, self.topk, 1, 1).expand(-1, -1, -1, w2, c_kv))
        k_sel, v_sel = topk_kv.split([self.qk_dim, self.dim], dim=-1)
        k_sel = k_sel.reshape(N, p2, self.topk, w2, m, -1).permute(0, 1, 4, 5, 2, 3).reshape(N * p2, m, -1, self.topk * w2)
        v_sel = v_sel.reshape(N, p2, self.topk, w2, m, -1).permute(0, 1, 4, 2, 3, 5).reshape(N * p2, m, self.topk * w2, -1)
        q_pix = q_pix.reshape(N, p2, w2, m, -1).permute(0, 1, 3, 2, 4).reshape(N * p2, m, w2, -1)

        attn = ((q_pix * self.scale) @ k_sel).softmax(dim=-1)
        out = attn @ v_sel
        # "(n j i) m (h w) c -> n (j h) (i w) (m c)"
        out = out.reshape(N, j, i, m, h, w, -1).permute(0, 1, 4, 2, 5, 3, 6).reshape(N, H, W, C)
        out = self.wo(out + lepe)
        if self.auto_pad and (pad_r or pad_b):
            out = out[:, :H_in, :W_in, :].contiguous()
        return out
