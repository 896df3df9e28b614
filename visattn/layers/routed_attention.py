"""BiFormer's attention modules: bi-level routing attention and global attention with LePE.

Parameters only; the routed op and LePE's depthwise conv (fused with its residual add) come from
``visattn.kernels``. Both take and return NHWC maps.
"""
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import register_notrace_function, register_notrace_module

from visattn.kernels import depthwise_conv2d_nhwc, region_topk_2d, routed_attention_2d
from visattn.kernels._checks import autocast_dtype
from visattn.layers.fused_block import (Tape, depthwise_conv_backward, depthwise_conv_forward, linear_backward,
                                        linear_forward, routed_qkv_backward, routed_qkv_forward)

try:
    from visattn.kernels._triton_common import unsupported_reason_for
    from visattn.kernels.triton_routed import MAX_ROUTING_REGIONS
except ImportError:  # triton ships with torch's Linux builds only
    unsupported_reason_for, MAX_ROUTING_REGIONS = None, 0

# Shape checks and a Triton dispatch: a leaf for torch.fx (BiFormer's blocks call it in traced code).
register_notrace_function(depthwise_conv2d_nhwc)


@register_notrace_module  # shape-dependent padding and routing: a leaf for torch.fx
class BiLevelRoutingAttention(nn.Module):
    """Bi-level routing attention (BiFormer, the ``ops/bra_legacy.py`` variant of the checkpoints).

    The map is cut into ``n_win x n_win`` regions. Each query region picks the ``topk`` key regions
    whose mean key best matches its mean query (detached, parameter-free routing), and its tokens
    attend to all tokens of those regions. A depthwise conv of V (LePE) is added before ``wo``.
    The logit scale is ``qk_dim ** -0.5`` (not head_dim's), as in the released models.

    With ``auto_pad`` the input is zero-padded right/bottom to a multiple of ``n_win`` before the
    projection (so padded tokens carry the projection biases, count in the region means and are
    keys) and the output cropped, as the official dense backbones do.

    Input and output: ``[B, H, W, dim]``.

    On the Triton backend it also implements the fused-block protocol of
    :class:`~visattn.layers.NHWCTransformerBlock` (``fused_*``): qkv, the routing, the routed op,
    LePE and ``wo`` with a hand-written backward.
    """

    def __init__(self, dim: int, num_heads: int, n_win: int, qk_dim: int, topk: int, side_dwconv: int = 5,
                 auto_pad: bool = False, backend: str = "auto"):
        super().__init__()
        if qk_dim % num_heads or dim % num_heads:
            raise ValueError(f"qk_dim ({qk_dim}) and dim ({dim}) must be divisible by num_heads ({num_heads})")
        if not 1 <= topk <= n_win ** 2:
            raise ValueError(f"topk must be in [1, {n_win ** 2}] (the n_win x n_win = {n_win}x{n_win} regions), got {topk}")
        self.num_heads, self.n_win, self.qk_dim, self.topk = num_heads, n_win, qk_dim, topk
        self.scale = qk_dim ** -0.5
        self.auto_pad = auto_pad
        self.backend = backend
        self.qkv = nn.Linear(dim, 2 * qk_dim + dim)  # [q | k | v]
        self.lepe = nn.Conv2d(dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim)
        self.wo = nn.Linear(dim, dim)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, n_win={self.n_win}, topk={self.topk}, auto_pad={self.auto_pad}"

    @torch.jit.ignore
    def _attend(self, qkv: torch.Tensor, C: int) -> torch.Tensor:
        # Kept out of TorchScript: routing and the op dispatch to Python backends.
        B, H, W, _ = qkv.shape
        n = self.n_win
        q, k, v = qkv.split([self.qk_dim, self.qk_dim, C], dim=-1)
        # Routing by the mean q / k of each window, without gradient (as the released models).
        # The gather backend (the official algorithm) routes with the official op sequence too.
        routing_backend = "reference" if self.backend in ("reference", "gather") else self.backend
        index = region_topk_2d(q, k, n, self.topk, self.scale, routing_backend)
        q, k, v = (t.unflatten(-1, (self.num_heads, -1)) for t in (q, k, v))
        # region_topk_2d's indices lie in [0, n_win**2) by construction: no range check needed.
        out = routed_attention_2d(q, k, v, index, n, self.scale, self.backend, check_index=False)
        return out.reshape(B, H, W, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        n = self.n_win
        if H < n or W < n:
            raise ValueError(f"BiLevelRoutingAttention: the map ({H}x{W}) is smaller than its n_win x n_win = {n}x{n} "
                             f"regions (a token each); expected at least {n} tokens per side")
        pad_h, pad_w = (n - H % n) % n, (n - W % n) % n
        if pad_h or pad_w:
            if not self.auto_pad:
                raise ValueError(f"BiLevelRoutingAttention: the map ({H}x{W}) must be divisible by n_win={n} "
                                 f"(or build the model with auto_pad=True)")
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        qkv = self.qkv(x)
        out = self._attend(qkv, C)
        out = depthwise_conv2d_nhwc(qkv[..., 2 * self.qk_dim:], self.lepe.weight, self.lepe.bias, out, "auto")
        out = self.wo(out)
        return out[:, :H, :W] if (pad_h or pad_w) else out

    # The routing and routed kernels have not yet run under CUDA-graph capture on a GPU, so the
    # fused BiFormer blocks run without graphs (visattn.layers.graphed_block).
    fused_graphs = False

    @torch.jit.ignore
    def fused_supported(self, x: torch.Tensor) -> bool:
        """Whether :meth:`fused_forward` computes ``self(x)``: the Triton kernels would run every op
        (backend ``"triton"``, or ``"auto"`` on CUDA) and the map needs no padding."""
        if unsupported_reason_for is None or self.backend not in ("auto", "triton") or x.dim() != 4:
            return False
        if self.backend == "auto" and not x.is_cuda:
            return False
        B, H, W, C = x.shape
        n = self.n_win
        if H < n or W < n or H % n or W % n or n * n > MAX_ROUTING_REGIONS:
            return False
        dtype = autocast_dtype(x.device.type)
        if dtype is None:
            if any(p.dtype != x.dtype for p in (self.qkv.weight, self.lepe.weight, self.wo.weight)):
                return False  # the modular ops raise, or promote as the fused ones do not
            dtype = x.dtype
        heads = self.num_heads
        return unsupported_reason_for(dtype, x.device, B * heads, self.qk_dim // heads, C // heads) is None

    @torch.jit.ignore
    def fused_parameters(self) -> tuple:
        return self.qkv.weight, self.qkv.bias, self.lepe.weight, self.lepe.bias, self.wo.weight, self.wo.bias

    @torch.jit.ignore
    def fused_linears(self) -> tuple:
        return self.qkv, self.wo

    @torch.jit.ignore
    def fused_forward(self, tape: Tape, x: torch.Tensor) -> torch.Tensor:
        C = x.shape[-1]
        qkv = linear_forward(tape, x, self.qkv.weight, self.qkv.bias)
        out = routed_qkv_forward(tape, qkv, (self.qk_dim, self.qk_dim, C), self.num_heads, (self.n_win, self.n_win),
                                 self.topk, self.scale)
        out = depthwise_conv_forward(tape, qkv[..., 2 * self.qk_dim:], self.lepe.weight, self.lepe.bias, out)
        return linear_forward(tape, out, self.wo.weight, self.wo.bias)

    @torch.jit.ignore
    def fused_backward(self, tape: Tape, grad: torch.Tensor) -> Tuple[torch.Tensor, tuple]:
        grad, d_wo_w, d_wo_b = linear_backward(tape, grad)
        grad_v, d_lepe_w, d_lepe_b, grad_attn = depthwise_conv_backward(tape, grad)
        grad_x, d_qkv_w, d_qkv_b = linear_backward(tape, routed_qkv_backward(tape, grad_attn, grad_v))
        return grad_x, (d_qkv_w, d_qkv_b, d_lepe_w, d_lepe_b, d_wo_w, d_wo_b)


class AttentionLePE(nn.Module):
    """Global multi-head self-attention with a depthwise-conv positional term (LePE) on its input
    (BiFormer's last stage: 8 heads, no qkv bias).

    Input and output: ``[B, H, W, dim]``.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, side_dwconv: int = 5,
                 qk_scale: Optional[float] = None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.lepe = nn.Conv2d(dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        q, k, v = self.qkv(x).reshape(B, H * W, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        out = out.transpose(1, 2).reshape(B, H, W, C)
        out = depthwise_conv2d_nhwc(x, self.lepe.weight, self.lepe.bias, out, "auto")
        return self.proj(out)
