"""Neighborhood-attention modules: parameters only, the op comes from ``visattn.kernels``."""

from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import register_notrace_module, to_2tuple, trunc_normal_

from visattn.kernels import na2d_qkv
from visattn.kernels._checks import autocast_dtype
from visattn.layers.fused_block import (Tape, dropout_inactive, linear_backward, linear_forward, na_qkv_backward,
                                        na_qkv_forward)

try:
    from visattn.kernels._triton_common import unsupported_reason_for
except ImportError:  # triton ships with torch's Linux builds only
    unsupported_reason_for = None


@register_notrace_module  # shape-dependent padding: torch.fx treats the module as a leaf
class NeighborhoodAttention2d(nn.Module):
    """2-D (dilated, strided) neighborhood attention with relative position bias, on NHWC maps.

    Parameters are registered as NATTEN 0.14/0.15 ``NeighborhoodAttention2D`` does (``qkv``,
    ``rpb`` ``[heads, 2k-1, 2k-1]``, ``proj``), so official NAT-family weights load unchanged.
    Like NATTEN 0.14, a map smaller than ``kernel_size * dilation`` on some axis is zero-padded
    right/bottom before ``qkv`` and cropped before ``proj``.

    Input and output: ``[B, H, W, dim]``.

    On the Triton backend it also implements the fused-block protocol of
    :class:`~visattn.layers.NHWCTransformerBlock` (``fused_*``): qkv, the op and proj with a
    hand-written backward.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        kernel_size: Union[int, Tuple[int, int]] = 7,
        dilation: Union[int, Tuple[int, int]] = 1,
        stride: Union[int, Tuple[int, int]] = 1,
        qkv_bias: bool = True,
        qk_scale: Optional[float] = None,
        rel_pos_bias: bool = True,
        proj_drop: float = 0.0,
        backend: str = "auto",
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = qk_scale or self.head_dim ** -0.5
        self.kernel_size = to_2tuple(kernel_size)
        self.dilation = to_2tuple(dilation)
        self.stride = to_2tuple(stride)
        self.backend = backend
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        if rel_pos_bias:
            self.rpb = nn.Parameter(torch.zeros(num_heads, 2 * self.kernel_size[0] - 1, 2 * self.kernel_size[1] - 1))
            trunc_normal_(self.rpb, std=0.02)
        else:
            self.register_parameter("rpb", None)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def extra_repr(self) -> str:
        return (
            f"num_heads={self.num_heads}, kernel_size={self.kernel_size}, dilation={self.dilation}, "
            f"stride={self.stride}, rel_pos_bias={self.rpb is not None}"
        )

    @torch.jit.ignore
    def _attend(self, qkv: torch.Tensor) -> torch.Tensor:
        # Kept out of TorchScript: the op dispatches to Python / Triton backends. The packed form:
        # the Triton backend writes the qkv gradient as one tensor (no stack of three).
        return na2d_qkv(qkv, self.kernel_size, self.dilation, self.stride, self.rpb, self.scale, self.backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        pad_h = max(0, self.kernel_size[0] * self.dilation[0] - H)
        pad_w = max(0, self.kernel_size[1] * self.dilation[1] - W)
        if pad_h > 0 or pad_w > 0:
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        Hp, Wp = H + pad_h, W + pad_w
        x = self._attend(self.qkv(x).reshape(B, Hp, Wp, 3, self.num_heads, self.head_dim))
        x = x[:, :H, :W].reshape(B, H, W, C)
        return self.proj_drop(self.proj(x))

    # The fused ops run under CUDA-graph capture (visattn.layers.graphed_block; tested on CUDA).
    fused_graphs = True

    @torch.jit.ignore
    def fused_supported(self, x: torch.Tensor) -> bool:
        """Whether :meth:`fused_forward` can compute ``self(x)``: the Triton backend would run it
        (``"triton"``, or ``"auto"`` on CUDA) and no padding is needed."""
        if unsupported_reason_for is None or self.backend not in ("auto", "triton") or x.dim() != 4:
            return False
        if not dropout_inactive(self.proj_drop):
            return False
        if self.backend == "auto" and not x.is_cuda:
            return False
        if any(size < k * d for size, k, d in zip(x.shape[1:3], self.kernel_size, self.dilation)):
            return False
        dtype = autocast_dtype(x.device.type) or x.dtype
        return unsupported_reason_for(dtype, x.device, x.shape[0] * self.num_heads, self.head_dim, self.head_dim) is None

    @torch.jit.ignore
    def fused_parameters(self) -> tuple:
        return self.qkv.weight, self.qkv.bias, self.rpb, self.proj.weight, self.proj.bias

    @torch.jit.ignore
    def fused_linears(self) -> tuple:
        return self.qkv, self.proj

    @torch.jit.ignore
    def fused_forward(self, tape: Tape, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        qkv = linear_forward(tape, x, self.qkv.weight, self.qkv.bias).view(B, H, W, 3, self.num_heads, self.head_dim)
        out = na_qkv_forward(tape, qkv, self.kernel_size, self.dilation, self.stride, self.rpb, self.scale)
        return linear_forward(tape, out.view(B, H, W, C), self.proj.weight, self.proj.bias)

    @torch.jit.ignore
    def fused_backward(self, tape: Tape, grad: torch.Tensor) -> Tuple[torch.Tensor, tuple]:
        grad, d_proj_w, d_proj_b = linear_backward(tape, grad)
        grad_qkv, d_rpb = na_qkv_backward(tape, grad.view(*grad.shape[:-1], self.num_heads, self.head_dim))
        grad_x, d_qkv_w, d_qkv_b = linear_backward(tape, grad_qkv.view(*grad_qkv.shape[:3], -1))
        return grad_x, (d_qkv_w, d_qkv_b, d_rpb, d_proj_w, d_proj_b)
