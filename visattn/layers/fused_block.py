"""A transformer block as one autograd node: its forward runs the ops without autograd, its
backward is written by hand from the same kernels.

Why: in eager training the host issues every op of every block, and for the deep, narrow NAT /
BiFormer trunks (30 blocks) at batch 128 that host time exceeds the GPU time. Per block the modular
path pays for ~18 module calls, ~40 autograd nodes (casts, views, drop-path products, residual adds,
their gradient casts) and one Python autograd Function per Triton op, with its hand-off to
autograd's device thread. The fused path issues the same GPU kernels (minus the residual adds,
which go into the LayerNorm backward) from two Python functions.

The pieces: a :class:`Tape` that the forward pushes saved tensors onto and the backward pops in
reverse (through ``ctx.save_for_backward``, so saved-tensor hooks such as activation
checkpointing's see them), and pairs ``<op>_forward(tape, ...)`` / ``<op>_backward(tape, grad)``
that mirror what autograd does for the modular ops, autocast's casts included (a Linear under
autocast computes in the autocast dtype and returns its weight gradients in the weights' dtype; on
CUDA those come straight from the fp32 accumulators, where autograd rounds them to the autocast
dtype first).
Modules that support the fused path implement ``fused_forward(tape, x)`` /
``fused_backward(tape, grad) -> (grad_x, param_grads)`` with these pairs and list their
parameters in ``fused_parameters()`` (the order of ``param_grads``; ``None`` for absent ones).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from timm.layers import Mlp

from visattn.kernels._checks import IntOrTuple, autocast_dtype, check_na_args
from visattn.kernels.layer_norm import layer_norm_backward as _ln_backward
from visattn.kernels.layer_norm import layer_norm_forward as _ln_forward

try:
    from visattn.kernels.depthwise_conv import depthwise_conv_backward as _dwconv_backward
    from visattn.kernels.depthwise_conv import depthwise_conv_forward as _dwconv_forward
    from visattn.kernels.triton_na import na_forward, na_packed_backward
    from visattn.kernels.triton_routed import region_topk_2d_triton, routed_backward, routed_forward
except ImportError:  # triton ships with torch's Linux builds only; the blocks then never take this path
    na_forward = na_packed_backward = region_topk_2d_triton = routed_forward = routed_backward = None

__all__ = ["Tape", "fused_block_apply", "linear_forward", "linear_backward", "layer_norm_forward",
           "layer_norm_backward", "gelu_forward", "gelu_backward", "residual_forward", "residual_backward",
           "mlp_forward", "mlp_backward", "mlp_supported", "dropout_inactive", "na_qkv_forward", "na_qkv_backward",
           "depthwise_conv_forward", "depthwise_conv_backward", "routed_qkv_forward", "routed_qkv_backward"]


class Tape:
    """Saved tensors and constants of a fused forward, popped in reverse order by its backward."""

    def __init__(self, compute_dtype: Optional[torch.dtype], tensors: Sequence[Optional[torch.Tensor]] = (),
                 constants: Sequence[object] = ()):
        # The autocast dtype the forward ran under (None: no autocast, ops in their inputs' dtypes).
        self.compute_dtype = compute_dtype
        self.tensors: List[Optional[torch.Tensor]] = list(tensors)
        self.constants: List[object] = list(constants)
        self._casts: Dict[int, torch.Tensor] = {}  # id(parameter) -> its copy in compute_dtype

    def precast(self, *tensors: Optional[torch.Tensor]) -> None:
        """Cast the ``tensors`` (parameters the block's Linears will use) that are not in the
        compute dtype, in one allocation and one multi-tensor copy instead of a cast each (each
        cast is an allocation and a launch on the host); :meth:`cast` then returns them."""
        dtype = self.compute_dtype
        todo = [t for t in tensors if t is not None and dtype is not None and t.dtype != dtype]
        if not todo:
            return
        flat = torch.empty(sum(t.numel() for t in todo), dtype=dtype, device=todo[0].device)
        copies = [c.view(t.shape) for c, t in zip(flat.split([t.numel() for t in todo]), todo)]
        torch._foreach_copy_(copies, todo)
        self._casts.update(zip(map(id, todo), copies))

    def cast(self, t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """``t`` in the compute dtype (as autocast casts a Linear's parameters): its :meth:`precast`
        copy, or a new cast."""
        copy = self._casts.get(id(t))
        return copy if copy is not None else _cast(t, self.compute_dtype)

    def save(self, *tensors: Optional[torch.Tensor]) -> None:
        self.tensors.extend(tensors)

    def keep(self, *constants: object) -> None:
        self.constants.extend(constants)

    def load(self, count: int) -> List[Optional[torch.Tensor]]:
        tensors = self.tensors[-count:]
        del self.tensors[-count:]
        return tensors

    def pop(self) -> object:
        return self.constants.pop()


_HALF = (torch.float16, torch.bfloat16)
# torch.mm(..., out_dtype=torch.float32) on half-precision CUDA inputs: torch >= 2.8.
_MM_FP32_OUT = torch.torch_version.TorchVersion(torch.__version__) >= (2, 8)


def _cast(t: Optional[torch.Tensor], dtype: Optional[torch.dtype]) -> Optional[torch.Tensor]:
    return t if t is None or dtype is None or t.dtype == dtype else t.to(dtype)


def linear_forward(tape: Tape, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` (``x`` ``[..., K]``; in the tape's compute dtype under autocast)."""
    x_c, w_c, b_c = _cast(x, tape.compute_dtype), tape.cast(weight), tape.cast(bias)
    rows = x_c.reshape(-1, x_c.shape[-1])
    out = torch.mm(rows, w_c.t()) if b_c is None else torch.addmm(b_c, rows, w_c.t())
    tape.save(rows, w_c)
    tape.keep((x.shape, x.dtype, weight.dtype, None if bias is None else bias.dtype))
    return out.view(*x.shape[:-1], weight.shape[0])


def linear_backward(tape: Tape, grad: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """``(grad_x, grad_weight, grad_bias)`` of :func:`linear_forward`, each in its input's dtype."""
    rows, w_c = tape.load(2)
    x_shape, x_dtype, w_dtype, b_dtype = tape.pop()
    g = _cast(grad, rows.dtype).reshape(-1, w_c.shape[0])
    grad_x = torch.mm(g, w_c).view(x_shape)
    if _MM_FP32_OUT and rows.is_cuda and rows.dtype in _HALF and w_dtype == torch.float32:
        # fp32 results straight from the fp32 accumulators, where autograd's modular path rounds
        # them to half precision and casts them up: two launches more per Linear, coarser numbers.
        grad_w = torch.mm(g.t(), rows, out_dtype=torch.float32)
        grad_b = None if b_dtype is None else g.sum(0, dtype=b_dtype)
    else:  # CPU ATen (and older torch) has no half-in, fp32-out mm
        grad_w = _cast(torch.mm(g.t(), rows), w_dtype)
        grad_b = None if b_dtype is None else _cast(g.sum(0), b_dtype)
    return _cast(grad_x, x_dtype), grad_w, grad_b


def layer_norm_forward(tape: Tape, x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                       eps: float, autocast_output: bool) -> torch.Tensor:
    """:func:`visattn.kernels.layer_norm` on the Triton kernels, over the last axis: under
    autocast fp32 out (or the compute dtype with ``autocast_output``) from fp32 weights."""
    dtype = tape.compute_dtype
    if dtype is None:
        out_dtype = x.dtype
    else:
        out_dtype = dtype if autocast_output else torch.float32
        weight, bias = _cast(weight, torch.float32), _cast(bias, torch.float32)
    out, rows, stats = _ln_forward(x, weight, bias, eps, out_dtype)
    tape.save(rows, weight, stats)
    tape.keep((x.shape, None if weight is None else weight.dtype, None if bias is None else bias.dtype))
    return out


def layer_norm_backward(tape: Tape, grad: torch.Tensor, grad_residual: Optional[torch.Tensor] = None
                        ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``(grad_x, grad_weight, grad_bias)``; ``grad_residual`` (the gradient the input also gets
    through a residual connection, in ``x``'s shape) is added to ``grad_x`` in the kernel."""
    rows, weight, stats = tape.load(3)
    x_shape, w_dtype, b_dtype = tape.pop()
    if grad_residual is not None and (grad_residual.dtype != rows.dtype or not grad_residual.is_contiguous()):
        grad_residual = grad_residual.to(rows.dtype).contiguous()
    return _ln_backward(grad, rows, weight, stats, x_shape, b_dtype, w_dtype is not None, b_dtype is not None,
                        grad_residual)


def gelu_forward(tape: Tape, x: torch.Tensor, approximate: str) -> torch.Tensor:
    """``F.gelu(x, approximate=...)`` (autocast leaves GELU in its input's dtype)."""
    tape.save(x)
    tape.keep(approximate)
    return F.gelu(x, approximate=approximate)


def gelu_backward(tape: Tape, grad: torch.Tensor) -> torch.Tensor:
    (x,) = tape.load(1)
    return torch.ops.aten.gelu_backward(_cast(grad, x.dtype), x, approximate=tape.pop())


def residual_forward(tape: Tape, x: torch.Tensor, branch: torch.Tensor, gamma: Optional[torch.Tensor],
                     drop_prob: float, scale_by_keep: bool = True) -> torch.Tensor:
    """``x + drop_path(branch * gamma)`` as timm's ``LayerScale`` and ``DropPath`` compute it
    (``gamma`` ``[C]`` or ``None``; ``drop_prob`` 0 outside training), the same products in the
    same dtypes, and the same random draw per sample."""
    t = branch if gamma is None else branch * gamma
    keep = None
    if drop_prob > 0.0:
        keep_prob = 1.0 - drop_prob
        keep = t.new_empty((t.shape[0],) + (1,) * (t.dim() - 1)).bernoulli_(keep_prob)
        if keep_prob > 0.0 and scale_by_keep:
            keep.div_(keep_prob)
        t = t * keep
    tape.save(branch if gamma is not None else None, gamma, keep)
    tape.keep((x.dtype, branch.dtype, t.dtype))
    return x + t


def residual_backward(tape: Tape, grad: torch.Tensor
                      ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """``(grad_x, grad_branch, grad_gamma)`` of :func:`residual_forward`."""
    branch, gamma, keep = tape.load(3)
    x_dtype, branch_dtype, t_dtype = tape.pop()
    g = _cast(grad, t_dtype)
    if keep is not None:
        g = g * keep
    grad_gamma = None
    if gamma is not None:
        grad_gamma = _cast((g * branch).sum(tuple(range(g.dim() - 1))), gamma.dtype)
        g = g * gamma
    return _cast(grad, x_dtype), _cast(g, branch_dtype), grad_gamma


def mlp_forward(tape: Tape, mlp: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm's ``Mlp`` (``fc1``, GELU, ``fc2``; no norm, no active dropout): see :func:`mlp_supported`."""
    tape.precast(mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias)
    h = gelu_forward(tape, linear_forward(tape, x, mlp.fc1.weight, mlp.fc1.bias), mlp.act.approximate)
    return linear_forward(tape, h, mlp.fc2.weight, mlp.fc2.bias)


def mlp_backward(tape: Tape, grad: torch.Tensor) -> Tuple[torch.Tensor, tuple]:
    """``(grad_x, (fc1.weight, fc1.bias, fc2.weight, fc2.bias) grads)``."""
    g, d_w2, d_b2 = linear_backward(tape, grad)
    g, d_w1, d_b1 = linear_backward(tape, gelu_backward(tape, g))
    return g, (d_w1, d_b1, d_w2, d_b2)


def dropout_inactive(drop: torch.nn.Module) -> bool:
    """Whether ``drop`` (an ``Identity`` or ``Dropout``) leaves its input as it is: the fused ops
    have no dropout."""
    return isinstance(drop, torch.nn.Identity) or (isinstance(drop, torch.nn.Dropout)
                                                   and (drop.p == 0.0 or not drop.training))


def mlp_supported(mlp: torch.nn.Module) -> bool:
    """Whether :func:`mlp_forward` computes ``mlp``'s forward: a timm ``Mlp`` with a GELU, no norm
    and no dropout that is active."""
    return (type(mlp) is Mlp and type(mlp.act) is torch.nn.GELU and isinstance(mlp.norm, torch.nn.Identity)
            and isinstance(mlp.fc1, torch.nn.Linear) and isinstance(mlp.fc2, torch.nn.Linear)
            and dropout_inactive(mlp.drop1) and dropout_inactive(mlp.drop2))


def na_qkv_forward(tape: Tape, qkv: torch.Tensor, kernel_size: IntOrTuple, dilation: IntOrTuple, stride: IntOrTuple,
                   rpb: Optional[torch.Tensor], scale: Optional[float]) -> torch.Tensor:
    """:func:`visattn.kernels.na2d_qkv` (any rank) on the Triton kernels: ``qkv``
    ``[B, *spatial, 3, heads, D]`` -> ``[B, *spatial, heads, D]``."""
    q, k, v = qkv.unbind(-3)
    params = check_na_args(qkv.dim() - 4, q, k, v, kernel_size, dilation, stride, rpb, scale)
    out, lse = na_forward(q, k, v, params, rpb)
    tape.save(qkv, rpb, out, lse)
    tape.keep(params)
    return out


def na_qkv_backward(tape: Tape, grad: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(grad_qkv, grad_rpb)`` of :func:`na_qkv_forward`."""
    qkv, rpb, out, lse = tape.load(4)
    return na_packed_backward(_cast(grad, out.dtype), qkv, rpb, out, lse, tape.pop())


def depthwise_conv_forward(tape: Tape, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                           residual: Optional[torch.Tensor]) -> torch.Tensor:
    """:func:`visattn.kernels.depthwise_conv2d_nhwc` on its Triton forward: ``[B, H, W, C]`` maps,
    the conv in the compute dtype (outside autocast ``x``'s, which the weights share)."""
    conv_dtype = tape.compute_dtype or x.dtype
    weight = weight if weight.is_contiguous() else weight.contiguous()
    out = _dwconv_forward(x, weight, bias, residual, conv_dtype)
    tape.save(x, weight)
    tape.keep((bias is not None, conv_dtype, None if residual is None else residual.dtype))
    return out


def depthwise_conv_backward(tape: Tape, grad: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
    """``(grad_x, grad_weight, grad_bias, grad_residual)`` of :func:`depthwise_conv_forward`."""
    x, weight = tape.load(2)
    has_bias, conv_dtype, residual_dtype = tape.pop()
    return _dwconv_backward(grad, x, weight, has_bias, conv_dtype, residual_dtype)


def routed_qkv_forward(tape: Tape, qkv: torch.Tensor, split: Sequence[int], num_heads: int,
                       region_grid: Tuple[int, int], topk: int, scale: float) -> torch.Tensor:
    """BiFormer's routing (:func:`visattn.kernels.region_topk_2d`, no gradient) and
    :func:`visattn.kernels.routed_attention_2d` on the Triton kernels, from one projection:
    ``qkv`` ``[B, H, W, qk + qk + C]`` split as ``split`` -> ``[B, H, W, C]``."""
    q, k, v = qkv.split(list(split), dim=-1)
    index = region_topk_2d_triton(q, k, region_grid, topk, scale)
    heads = [t.unflatten(-1, (num_heads, -1)) for t in (q, k, v)]
    out, lse = routed_forward(*heads, index, scale, region_grid)
    tape.save(qkv, index, out, lse)
    tape.keep((tuple(split), num_heads, region_grid, scale))
    return out.flatten(-2)


def routed_qkv_backward(tape: Tape, grad: torch.Tensor, grad_v: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``grad_qkv`` of :func:`routed_qkv_forward` (``[B, H, W, qk + qk + C]``); ``grad_v``, a
    gradient V also gets elsewhere (BiFormer's LePE conv), is added to its part."""
    qkv, index, out, lse = tape.load(4)
    split, num_heads, region_grid, scale = tape.pop()
    q, k, v = (t.unflatten(-1, (num_heads, -1)) for t in qkv.split(list(split), dim=-1))
    grad = _cast(grad, out.dtype).unflatten(-1, (num_heads, -1))
    dq, dk, dv = (t.flatten(-2) for t in routed_backward(grad, q, k, v, index, out, lse, scale, region_grid))
    if grad_v is not None:
        dv = dv + grad_v
    return torch.cat((dq, dk, dv), dim=-1)


class _FusedBlock(torch.autograd.Function):
    @staticmethod
    def forward(ctx, block, compute_dtype, x, *params):
        tape = Tape(compute_dtype)
        with torch.autocast(x.device.type, enabled=False):  # the ops cast as autocast would
            out = block.fused_forward(tape, x)
        ctx.save_for_backward(*tape.tensors)
        ctx.constants, ctx.block, ctx.compute_dtype = tape.constants, block, compute_dtype
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        tape = Tape(ctx.compute_dtype, ctx.saved_tensors, ctx.constants)
        with torch.autocast(grad.device.type, enabled=False):  # backward may run inside autocast
            grad_x, param_grads = ctx.block.fused_backward(tape, grad)
        return (None, None, grad_x, *param_grads)


def fused_block_apply(block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``block(x)`` as one autograd node: ``block.fused_forward`` / ``fused_backward`` over
    ``block.fused_parameters()``, under the caller's autocast state."""
    return _FusedBlock.apply(block, autocast_dtype(x.device.type), x, *block.fused_parameters())
