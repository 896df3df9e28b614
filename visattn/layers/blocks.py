"""Transformer blocks shared by the attention families."""

import os
from typing import Optional, Tuple, Type

import torch
import torch.nn as nn
from timm.layers import DropPath, LayerScale, Mlp

from visattn.kernels import depthwise_conv2d_nhwc
from visattn.kernels.layer_norm import triton_supports
from visattn.kernels._checks import autocast_dtype
from visattn.layers.fused_block import (ColumnSums, Tape, depthwise_conv_backward, depthwise_conv_forward,
                                        fused_block_apply, layer_norm_backward, layer_norm_forward, linear_parameters,
                                        mlp_backward, mlp_forward, mlp_supported, residual_backward,
                                        residual_forward, residual_layer_norm_backward, residual_layer_norm_forward)
from visattn.layers.graphed_block import graphed_block_apply, graphs_usable
from visattn.layers.norm import LayerNorm

# A leaf for torch.fx in this module's traced code (the position conv: shape checks, a Triton
# dispatch); fx patches this module's name, which an autowrap registration does not reach when a
# subclass's forward (BiFormer's) calls residual_branches.
torch.fx.wrap("depthwise_conv2d_nhwc")


class NHWCTransformerBlock(nn.Module):
    """Pre-norm transformer block on channels-last maps ``[B, H, W, C]``:

    ``x = x + drop_path(ls1(attn(norm1(x))))``; ``x = x + drop_path(ls2(mlp(norm2(x))))``.

    ``conv_pos_embed`` (a kernel size) first adds a depthwise-conv position embedding,
    ``x = x + pos_embed(x)`` (BiFormer's; CPVT's conditional position encoding).

    ``attn`` is any module mapping ``[B, H, W, C]`` to itself; ``mlp_layer`` builds the MLP as
    ``mlp_layer(dim, hidden, act_layer=..., drop=...)`` (timm's ``Mlp`` by default). ``layer_scale``
    (an init value) enables the per-channel ``ls1.gamma`` / ``ls2.gamma`` scales.
    ``autocast_norm_output`` lets the norms (when they are :class:`~visattn.layers.LayerNorm`) return
    the autocast dtype under autocast: for ``attn`` / ``mlp`` whose every use of their input goes
    through ops autocast casts to that dtype anyway (a Linear or Conv, after exact pads / reshapes),
    which then see the same values, without an fp32 copy of the normed map and its cast.

    Fused path: when ``attn`` implements ``fused_supported`` / ``fused_forward`` /
    ``fused_backward`` / ``fused_parameters`` (:class:`~visattn.layers.NeighborhoodAttention2d` and
    :class:`~visattn.layers.BiLevelRoutingAttention` on their Triton backends), the norms run on
    the Triton LayerNorm, the MLP is timm's ``Mlp`` with a GELU and the layer scales and drop paths
    are timm's, the eager forward runs the block (position conv included) as one autograd node
    with a hand-written backward (:mod:`visattn.layers.fused_block`): the same kernels for a
    fraction of the host time. ``fused = False`` (on the class or an instance) or the
    environment variable ``VISATTN_FUSED_BLOCKS=0`` turns it off; TorchScript, ``torch.fx`` and
    ``torch.compile`` always see the modular forward. Hooks on the submodules do not run on the
    fused path.

    CUDA graphs: in CUDA training (grad mode) the fused path runs from a CUDA graph of the block's
    forward and one of its backward per call signature, captured on its second and third calls
    (:mod:`visattn.layers.graphed_block`, which says when they are not used): one launch per
    block and direction instead of ~17. They hold a copy of the block's activations each.
    ``cuda_graphs = False`` or ``VISATTN_BLOCK_GRAPHS=0`` turns them off.
    """

    fused: bool = True
    cuda_graphs: bool = True

    def __init__(
        self,
        dim: int,
        attn: nn.Module,
        mlp_ratio: float = 4.0,
        layer_scale: Optional[float] = None,
        drop_path: float = 0.0,
        proj_drop: float = 0.0,
        act_layer: Type[nn.Module] = nn.GELU,
        norm_layer: Type[nn.Module] = LayerNorm,
        mlp_layer: Type[nn.Module] = Mlp,
        autocast_norm_output: bool = False,
        conv_pos_embed: int = 0,
    ):
        super().__init__()
        self.pos_embed = (nn.Conv2d(dim, dim, conv_pos_embed, padding=conv_pos_embed // 2, groups=dim)
                          if conv_pos_embed else None)
        self.norm1 = norm_layer(dim)
        self.attn = attn
        self.ls1 = LayerScale(dim, layer_scale) if layer_scale else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = mlp_layer(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.ls2 = LayerScale(dim, layer_scale) if layer_scale else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        for norm in (self.norm1, self.norm2):
            if isinstance(norm, LayerNorm):
                norm.autocast_output = autocast_norm_output

    def residual_branches(self, x: torch.Tensor) -> torch.Tensor:
        """The position embedding and the two pre-norm residual updates (subclasses wrap them;
        TorchScript has no ``super()``)."""
        if self.pos_embed is not None:
            x = depthwise_conv2d_nhwc(x, self.pos_embed.weight, self.pos_embed.bias, x, "auto")
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self.residual_branches(x)
        return self._forward_eager(x)

    @torch.jit.ignore
    def _forward_eager(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused_path_taken(x):
            return graphed_block_apply(self, x) if graphs_usable(self, x) else fused_block_apply(self, x)
        return self.residual_branches(x)

    @torch.jit.ignore
    def fused_path_taken(self, x: torch.Tensor) -> bool:
        """Whether ``forward(x)`` runs as one autograd node (see the class docstring)."""
        if not (self.fused and isinstance(x, torch.Tensor) and os.environ.get("VISATTN_FUSED_BLOCKS", "1") != "0"
                and os.environ.get("VISATTN_LAYER_NORM") != "torch"):
            return False  # off, or traced by torch.fx (x is a Proxy)
        if torch.compiler.is_compiling() or not hasattr(self.attn, "fused_forward"):
            return False
        norms_ok = all(type(n) is LayerNorm and len(n.normalized_shape) == 1 and triton_supports(x, n.normalized_shape[0])
                       for n in (self.norm1, self.norm2))
        scales_ok = all(isinstance(ls, nn.Identity) or (type(ls) is LayerScale and not ls.inplace)
                        for ls in (self.ls1, self.ls2))
        drops_ok = all(isinstance(dp, (nn.Identity, DropPath)) for dp in (self.drop_path1, self.drop_path2))
        if not (norms_ok and scales_ok and drops_ok and mlp_supported(self.mlp) and self.attn.fused_supported(x)):
            return False
        # The Triton depthwise conv takes weights of x's dtype outside autocast, as F.conv2d does.
        return self.pos_embed is None or autocast_dtype(x.device.type) is not None or self.pos_embed.weight.dtype == x.dtype

    @staticmethod
    def _residual_args(ls: nn.Module, drop_path: nn.Module) -> Tuple[Optional[torch.Tensor], float, bool]:
        gamma = ls.gamma if isinstance(ls, LayerScale) else None
        if isinstance(drop_path, DropPath) and drop_path.training:
            return gamma, drop_path.drop_prob, drop_path.scale_by_keep
        return gamma, 0.0, True

    @torch.jit.ignore
    def fused_parameters(self) -> tuple:
        """The tensors :meth:`fused_backward` returns gradients for, in its order."""
        gammas = [ls.gamma if isinstance(ls, LayerScale) else None for ls in (self.ls1, self.ls2)]
        mlp = self.mlp
        pos = () if self.pos_embed is None else (self.pos_embed.weight, self.pos_embed.bias)
        return (*pos, self.norm1.weight, self.norm1.bias, *self.attn.fused_parameters(), gammas[0],
                self.norm2.weight, self.norm2.bias, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias,
                gammas[1])

    @torch.jit.ignore
    def fused_forward(self, tape: Tape, x: torch.Tensor) -> torch.Tensor:
        """:meth:`residual_branches` without autograd, saving what :meth:`fused_backward` needs."""
        n1, n2, mlp = self.norm1, self.norm2, self.mlp
        tape.precast(*linear_parameters(*self.attn.fused_linears(), mlp.fc1, mlp.fc2))
        if self.pos_embed is not None:
            x = depthwise_conv_forward(tape, x, self.pos_embed.weight, self.pos_embed.bias, x)
        h = layer_norm_forward(tape, x, n1.weight, n1.bias, n1.eps, n1.autocast_output)
        x, h = residual_layer_norm_forward(tape, x, self.attn.fused_forward(tape, h),
                                           *self._residual_args(self.ls1, self.drop_path1),
                                           n2.weight, n2.bias, n2.eps, n2.autocast_output)
        return residual_forward(tape, x, mlp_forward(tape, mlp, h), *self._residual_args(self.ls2, self.drop_path2))

    @torch.jit.ignore
    def fused_backward(self, tape: Tape, grad: torch.Tensor) -> Tuple[torch.Tensor, tuple]:
        """``(grad_x, gradients of fused_parameters())`` from the output's gradient."""
        fc2_bias = self.mlp.fc2.bias
        sums = ColumnSums(grad, 7)  # fc2's bias, the norms' weights and biases, the layer scales
        grad_x, grad_m = residual_backward(tape, grad, sums, None if fc2_bias is None else fc2_bias.dtype)
        grad_h, mlp_grads = mlp_backward(tape, grad_m, fc2_bias_grad=False)
        grad_x, grad_a = residual_layer_norm_backward(tape, grad_h, grad_x, sums)
        grad_h, attn_grads = self.attn.fused_backward(tape, grad_a)
        grad_x, _, _ = layer_norm_backward(tape, grad_h, grad_x, sums)
        pos_grads = ()
        if self.pos_embed is not None:
            grad_conv, d_pos_w, d_pos_b, grad_x = depthwise_conv_backward(tape, grad_x)
            grad_x, pos_grads = grad_x + grad_conv, (d_pos_w, d_pos_b)
        # The slots in the order taken: residual 2 (gamma2, fc2's bias), norm 2, gamma1, norm 1.
        column_sums = sums.reduce()
        has_gamma = [isinstance(ls, LayerScale) for ls in (self.ls1, self.ls2)]
        d_gamma2 = column_sums.pop(0) if has_gamma[1] else None
        d_b2 = column_sums.pop(0) if fc2_bias is not None else None
        d_n2w, d_n2b = column_sums.pop(0), column_sums.pop(0)
        d_gamma1 = column_sums.pop(0) if has_gamma[0] else None
        d_n1w, d_n1b = column_sums
        d_w1, d_b1, d_w2, _ = mlp_grads
        return grad_x, (*pos_grads, d_n1w, d_n1b, *attn_grads, d_gamma1, d_n2w, d_n2b, d_w1, d_b1, d_w2, d_b2,
                        d_gamma2)
