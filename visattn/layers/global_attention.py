"""Global multi-head self-attention with a 2-D relative position bias table (ViT-rpb)."""

import torch
import torch.nn as nn
from timm.layers import register_notrace_module, trunc_normal_


def relative_position_index(size: int) -> torch.Tensor:
    """Flat index into a ``[2L-1, 2L-1]`` table of the offset (key - query) for every token pair.

    Returns int64 ``[L*L, L*L]``; entry ``[i, j]`` is ``(yj - yi + L - 1) * (2L - 1) + (xj - xi + L - 1)``,
    the same offset convention as neighborhood attention's rpb.
    """
    coords = torch.stack(torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")).flatten(1)
    rel = coords[:, None, :] - coords[:, :, None] + (size - 1)  # [2, query, key]
    return rel[0] * (2 * size - 1) + rel[1]


@register_notrace_module  # input-size check: torch.fx treats the module as a leaf
class GlobalAttentionRPB(nn.Module):
    """MHSA over all tokens of a fixed ``input_size x input_size`` NHWC map plus a learned bias
    ``rpb [heads, 2L-1, 2L-1]`` indexed by the (key - query) offset.

    Input and output: ``[B, L, L, dim]``.
    """

    def __init__(self, dim: int, num_heads: int, input_size: int, qkv_bias: bool = True, proj_drop: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.input_size = input_size
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.rpb = nn.Parameter(torch.zeros(num_heads, 2 * input_size - 1, 2 * input_size - 1))
        trunc_normal_(self.rpb, std=0.02)
        self.register_buffer("relative_position_index", relative_position_index(input_size), persistent=False)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        if H != self.input_size or W != self.input_size:
            raise ValueError(
                f"GlobalAttentionRPB expects a {self.input_size}x{self.input_size} map (its rpb table is "
                f"tied to that size), got {H}x{W}"
            )
        N = H * W
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        bias = self.rpb.flatten(1)[:, self.relative_position_index.view(-1)].view(1, self.num_heads, N, N)
        # Explicit matmuls (196 tokens): same op order as the official code, and visible to
        # torch's flop counter, which does not count the CPU SDPA kernel.
        attn = ((q * self.scale) @ k.transpose(-2, -1) + bias).softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(B, H, W, C)
        return self.proj_drop(self.proj(x))
