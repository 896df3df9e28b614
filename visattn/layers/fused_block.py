"""A transformer block as one autograd node: its forward runs the ops without autograd, its
backward is written by hand from the same kernels.

Why: in eager training the host issues every op of every block, and for the deep, narrow NAT /
BiFormer trunks (30 blocks) at batch 128 that host time exceeds the GPU time. Per block the modular
path pays for ~18 module calls, ~40 autograd nodes (casts, views, drop-path products, residual adds,
their gradient casts) and one Python autograd Function per Triton op, with its hand-off to
autograd's device thread. The fused path issues the same GPU kernels from two Python functions,
minus the residual adds, drop-path / layer-scale products and most column sums, which go into the
LayerNorm kernels (below).

The pieces: a :class:`Tape` that the forward pushes saved tensors onto and the backward pops in
reverse (through ``ctx.save_for_backward``, so saved-tensor hooks such as activation
checkpointing's see them), and pairs ``<op>_forward(tape, ...)`` / ``<op>_backward(tape, grad)``
that mirror what autograd does for the modular ops, autocast's casts included (a Linear under
autocast computes in the autocast dtype and returns its weight gradients in the weights' dtype; on
CUDA those come straight from the fp32 accumulators, where autograd rounds them to the autocast
dtype first).
Modules that support the fused path implement ``fused_forward(tape, x)`` /
``fused_backward(tape, grad) -> (grad_x, param_grads)`` with these pairs, list their
parameters in ``fused_parameters()`` (the order of ``param_grads``; ``None`` for absent ones)
and the Linears they run in ``fused_linears()`` (whose parameters the block casts in one copy).
The residual adds, with their drop paths and layer scales, run in the LayerNorm kernels (the
second norm's forward adds the first residual; its backward computes the branch's gradient),
and the column sums of the backward (norm, layer-scale and the MLP's last bias gradients) are
partial sums that one reduction per block finishes (:class:`ColumnSums`).
"""
from __future__ import annotations

import functools
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from timm.layers import Mlp

from visattn.kernels._checks import IntOrTuple, autocast_dtype, check_na_args
from visattn.kernels.layer_norm import layer_norm_backward as _ln_backward
from visattn.kernels.layer_norm import layer_norm_forward as _ln_forward
from visattn.kernels.layer_norm import residual_backward as _residual_backward
from visattn.kernels.layer_norm import residual_forward as _residual_forward
from visattn.kernels.layer_norm import row_programs, scaled_dtype

try:
    from visattn.kernels.depthwise_conv import depthwise_conv_backward as _dwconv_backward
    from visattn.kernels.depthwise_conv import depthwise_conv_forward as _dwconv_forward
    from visattn.kernels.triton_na import na_forward, na_packed_backward
    from visattn.kernels.triton_routed import region_topk_2d_triton, routed_backward, routed_forward
except ImportError:  # triton ships with torch's Linux builds only; the blocks then never take this path
    na_forward = na_packed_backward = region_topk_2d_triton = routed_forward = routed_backward = None

__all__ = ["Tape", "ColumnSums", "fused_block_apply", "linear_parameters", "linear_forward", "linear_backward", "layer_norm_forward",
           "layer_norm_backward", "gelu_forward", "gelu_backward", "residual_forward", "residual_backward",
           "residual_layer_norm_forward", "residual_layer_norm_backward",
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
        """Cast the ``tensors`` (parameters the block's Linears will use, see
        :func:`linear_parameters`) that are not in the compute dtype, in one allocation and one
        multi-tensor copy instead of a cast each (each cast is an allocation and a launch on the
        host); :meth:`cast` then returns them."""
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


class ColumnSums:
    """Gradients that are column sums over all rows of a block's ``[M, C]`` maps (LayerNorm
    weights and biases, layer scales, the bias of the MLP's last Linear), which the row kernels of
    the block's backward compute as per-program partial sums into slots of one fp32 buffer: one
    reduction at the end sums them all (one launch per block instead of one per gradient).

    ``take(*finishes)`` hands out the next slots, one per gradient, each with the dtypes its sum is
    cast through (``()`` for fp32 as it is, ``None`` for a sum nobody wants); ``reduce()`` returns
    the gradients in the order they were taken.
    """

    def __init__(self, like: torch.Tensor, max_slots: int):
        C = like.shape[-1]
        self.partials = torch.empty((max_slots, row_programs(like.numel() // C, C), C), dtype=torch.float32,
                                    device=like.device)
        self.finishes: List[Optional[Tuple[torch.dtype, ...]]] = []

    def take(self, *finishes: Optional[Tuple[torch.dtype, ...]]) -> Optional[torch.Tensor]:
        """The partial-sum slots (``[len(finishes), programs, C]``) for the next gradients."""
        first = len(self.finishes)
        if first + len(finishes) > self.partials.shape[0]:
            raise RuntimeError(f"ColumnSums holds {self.partials.shape[0]} slots, {first + len(finishes)} taken")
        self.finishes.extend(finishes)
        return self.partials[first:first + len(finishes)] if finishes else None

    def reduce(self) -> List[Optional[torch.Tensor]]:
        sums = self.partials[:len(self.finishes)].sum(1).unbind(0)
        out = []
        for total, finish in zip(sums, self.finishes):
            if finish is not None:
                for dtype in finish:
                    total = _cast(total, dtype)
            out.append(None if finish is None else total)
        return out


_HALF = (torch.float16, torch.bfloat16)
# torch.mm(..., out_dtype=torch.float32) on half-precision CUDA inputs: torch >= 2.8.
_MM_FP32_OUT = torch.torch_version.TorchVersion(torch.__version__) >= (2, 8)


def _cast(t: Optional[torch.Tensor], dtype: Optional[torch.dtype]) -> Optional[torch.Tensor]:
    return t if t is None or dtype is None or t.dtype == dtype else t.to(dtype)


def linear_parameters(*linears: torch.nn.Linear) -> List[Optional[torch.Tensor]]:
    """The weights and biases of ``linears``, for one :meth:`Tape.precast` of a whole block."""
    return [p for linear in linears for p in (linear.weight, linear.bias)]


def linear_forward(tape: Tape, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` (``x`` ``[..., K]``; in the tape's compute dtype under autocast)."""
    x_c, w_c, b_c = _cast(x, tape.compute_dtype), tape.cast(weight), tape.cast(bias)
    rows = x_c.reshape(-1, x_c.shape[-1])
    out = torch.mm(rows, w_c.t()) if b_c is None else torch.addmm(b_c, rows, w_c.t())
    tape.save(rows, w_c)
    tape.keep((x.shape, x.dtype, weight.dtype, None if bias is None else bias.dtype))
    return out.view(*x.shape[:-1], weight.shape[0])


def linear_backward(tape: Tape, grad: torch.Tensor, bias_grad: bool = True
                    ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """``(grad_x, grad_weight, grad_bias)`` of :func:`linear_forward`, each in its input's dtype;
    ``bias_grad=False``: ``grad_bias`` is ``None`` (the caller sums ``grad`` elsewhere)."""
    rows, w_c = tape.load(2)
    x_shape, x_dtype, w_dtype, b_dtype = tape.pop()
    if not bias_grad:
        b_dtype = None
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


def _norm_args(tape: Tape, x_dtype: torch.dtype, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
               autocast_output: bool) -> tuple:
    # Under autocast LayerNorm runs in fp32 from fp32 weights: fp32 out, or the compute dtype with
    # autocast_output (the norm's output then only feeds ops autocast casts to it).
    dtype = tape.compute_dtype
    if dtype is None:
        return weight, bias, x_dtype
    return _cast(weight, torch.float32), _cast(bias, torch.float32), dtype if autocast_output else torch.float32


def _save_norm(tape: Tape, rows: torch.Tensor, weight: Optional[torch.Tensor], stats: torch.Tensor,
               x_shape: torch.Size, bias: Optional[torch.Tensor]) -> None:
    tape.save(rows, weight, stats)
    tape.keep((x_shape, None if weight is None else weight.dtype, None if bias is None else bias.dtype))


def layer_norm_forward(tape: Tape, x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                       eps: float, autocast_output: bool) -> torch.Tensor:
    """:func:`visattn.kernels.layer_norm` on the Triton kernels, over the last axis: under
    autocast fp32 out (or the compute dtype with ``autocast_output``) from fp32 weights."""
    weight, bias, out_dtype = _norm_args(tape, x.dtype, weight, bias, autocast_output)
    out, rows, stats = _ln_forward(x, weight, bias, eps, out_dtype)
    _save_norm(tape, rows, weight, stats, x.shape, bias)
    return out


def layer_norm_backward(tape: Tape, grad: torch.Tensor, grad_residual: Optional[torch.Tensor] = None,
                        sums: Optional[ColumnSums] = None
                        ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``(grad_x, grad_weight, grad_bias)``; ``grad_residual`` (the gradient the input also gets
    through a residual connection, in ``x``'s shape) is added to ``grad_x`` in the kernel. With
    ``sums`` the weight and bias gradients are two slots of it (and ``None`` here)."""
    rows, weight, stats = tape.load(3)
    x_shape, w_dtype, b_dtype = tape.pop()
    if grad_residual is not None and (grad_residual.dtype != rows.dtype or not grad_residual.is_contiguous()):
        grad_residual = grad_residual.to(rows.dtype).contiguous()
    partial = None
    if sums is not None:
        partial = sums.take(None if w_dtype is None else (w_dtype,), None if b_dtype is None else (b_dtype,))
    return _ln_backward(grad, rows, weight, stats, x_shape, b_dtype, w_dtype is not None, b_dtype is not None,
                        grad_residual, partial)


def gelu_forward(tape: Tape, x: torch.Tensor, approximate: str) -> torch.Tensor:
    """``F.gelu(x, approximate=...)`` (autocast leaves GELU in its input's dtype)."""
    tape.save(x)
    tape.keep(approximate)
    return F.gelu(x, approximate=approximate)


def gelu_backward(tape: Tape, grad: torch.Tensor) -> torch.Tensor:
    (x,) = tape.load(1)
    return torch.ops.aten.gelu_backward(_cast(grad, x.dtype), x, approximate=tape.pop())


def _scaled_dtype(branch: torch.Tensor, gamma: Optional[torch.Tensor]) -> torch.dtype:
    return scaled_dtype(branch.dtype, None if gamma is None else gamma.dtype)


@functools.lru_cache(maxsize=None)
def _keep_scale(keep_prob: float) -> float:
    # What timm's ``keep.div_(keep_prob)`` makes a kept sample's 1: ATen divides in fp32, as numpy's
    # float32 does (IEEE division, correctly rounded); no torch op, so none under capture or counting.
    return float(np.float32(1.0) / np.float32(keep_prob))


def _draw_keep(branch: torch.Tensor, gamma: Optional[torch.Tensor], drop_prob: float,
               scale_by_keep: bool) -> Tuple[Optional[torch.Tensor], float]:
    # timm's DropPath draw: bernoulli_ on a [B, 1, ...] tensor of the branch's (scaled) dtype, the
    # same draw as the modular path's; the scaling is left to the kernel.
    if drop_prob <= 0.0:
        return None, 1.0
    keep_prob = 1.0 - drop_prob
    keep = torch.empty((branch.shape[0],) + (1,) * (branch.dim() - 1), dtype=_scaled_dtype(branch, gamma),
                       device=branch.device)
    keep.bernoulli_(keep_prob)
    return keep, (_keep_scale(keep_prob) if keep_prob > 0.0 and scale_by_keep else 1.0)


def _save_residual(tape: Tape, branch: torch.Tensor, gamma: Optional[torch.Tensor], keep: Optional[torch.Tensor],
                   keep_scale: float) -> None:
    tape.save(branch if gamma is not None else None, gamma, keep)
    tape.keep((branch.dtype, keep_scale))


def residual_forward(tape: Tape, x: torch.Tensor, branch: torch.Tensor, gamma: Optional[torch.Tensor],
                     drop_prob: float, scale_by_keep: bool = True) -> torch.Tensor:
    """``x + drop_path(branch * gamma)`` as timm's ``LayerScale`` and ``DropPath`` compute it (the
    same products rounded to the same dtypes, the same random draw per sample; ``gamma`` ``[C]`` or
    ``None``; ``drop_prob`` 0 outside training), in one kernel after the draw."""
    keep, keep_scale = _draw_keep(branch, gamma, drop_prob, scale_by_keep)
    s = _residual_forward(x, branch, gamma, keep, keep_scale)[0]
    _save_residual(tape, branch, gamma, keep, keep_scale)
    return s


def residual_backward(tape: Tape, grad: torch.Tensor, sums: ColumnSums, bias_dtype: Optional[torch.dtype]
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(grad_x, grad_branch)`` of :func:`residual_forward`; ``gamma``'s gradient and, with
    ``bias_dtype``, the column sums of ``grad_branch`` (the gradient of a bias added last in the
    branch, in ``bias_dtype``) are slots of ``sums``."""
    return _residual_backward_from(tape, grad, sums, bias_dtype)


def residual_layer_norm_forward(tape: Tape, x: torch.Tensor, branch: torch.Tensor, gamma: Optional[torch.Tensor],
                                drop_prob: float, scale_by_keep: bool, weight: Optional[torch.Tensor],
                                bias: Optional[torch.Tensor], eps: float, autocast_output: bool
                                ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``s = x + drop_path(branch * gamma)`` (:func:`residual_forward`) and ``layer_norm(s)``
    (:func:`layer_norm_forward`) in one kernel: ``(s, normed s)``."""
    keep, keep_scale = _draw_keep(branch, gamma, drop_prob, scale_by_keep)
    s_dtype = torch.promote_types(x.dtype, _scaled_dtype(branch, gamma))
    weight, bias, out_dtype = _norm_args(tape, s_dtype, weight, bias, autocast_output)
    s, out, rows, stats = _residual_forward(x, branch, gamma, keep, keep_scale, (weight, bias, eps, out_dtype))
    _save_residual(tape, branch, gamma, keep, keep_scale)
    _save_norm(tape, rows, weight, stats, s.shape, bias)
    return s, out


def residual_layer_norm_backward(tape: Tape, grad: torch.Tensor, grad_s: torch.Tensor, sums: ColumnSums
                                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(grad_x, grad_branch)`` of :func:`residual_layer_norm_forward` from the normed output's
    gradient ``grad`` and the gradient ``grad_s`` that ``s`` gets from its other uses; the
    LayerNorm's weight and bias gradients and ``gamma``'s are slots of ``sums``."""
    rows, weight, stats = tape.load(3)
    _, w_dtype, b_dtype = tape.pop()
    norm_finishes = (None if w_dtype is None else (w_dtype,), None if b_dtype is None else (b_dtype,))
    return _residual_backward_from(tape, grad_s, sums, None, (grad, rows, weight, stats), norm_finishes)


def _residual_backward_from(tape: Tape, grad_s: torch.Tensor, sums: ColumnSums, bias_dtype: Optional[torch.dtype],
                            norm: Optional[tuple] = None, norm_finishes: tuple = ()
                            ) -> Tuple[torch.Tensor, torch.Tensor]:
    branch, gamma, keep = tape.load(3)
    branch_dtype, keep_scale = tape.pop()
    finishes = list(norm_finishes)  # the kernel's slots: the LayerNorm's, gamma's, the bias's
    if gamma is not None:  # ATen sums the products in their dtype T, then casts to gamma's
        finishes.append((scaled_dtype(branch_dtype, gamma.dtype), gamma.dtype))
    if bias_dtype is not None:
        finishes.append((bias_dtype,))
    return _residual_backward(grad_s, branch_dtype, branch, gamma, keep, keep_scale, sums.take(*finishes),
                              bias_dtype is not None, norm)


def mlp_forward(tape: Tape, mlp: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm's ``Mlp`` (``fc1``, GELU, ``fc2``; no norm, no active dropout): see :func:`mlp_supported`."""
    h = gelu_forward(tape, linear_forward(tape, x, mlp.fc1.weight, mlp.fc1.bias), mlp.act.approximate)
    return linear_forward(tape, h, mlp.fc2.weight, mlp.fc2.bias)


def mlp_backward(tape: Tape, grad: torch.Tensor, fc2_bias_grad: bool = True) -> Tuple[torch.Tensor, tuple]:
    """``(grad_x, (fc1.weight, fc1.bias, fc2.weight, fc2.bias) grads)``; ``fc2_bias_grad=False``:
    ``fc2.bias``'s is ``None`` (the caller sums ``grad`` elsewhere)."""
    g, d_w2, d_b2 = linear_backward(tape, grad, fc2_bias_grad)
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
