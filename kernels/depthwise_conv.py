"""Depthwise 2-D convolution of channels-last maps with a fused residual add, Triton on CUDA.

BiFormer adds a depthwise conv to every block twice (the 3x3 positional conv on the block input,
LePE's 5x5 on V): through ``nn.Conv2d`` each is a permute, two autocast weight casts, a cuDNN call
(tens of µs of host time per call) and a residual add. Here one Triton launch computes
``residual + conv(x)`` on the ``[B, H, W, C]`` map where it lies (1.2-2x cuDNN's conv and add on
the H200, ``visattn bench dwconv``). The backward is cuDNN's (``aten.convolution_backward`` on the
NCHW views, in the conv dtype), which measured 1.5-2x faster than a Triton backward (BiFormer-S
stage 1 on the H200).
Calls under ``torch.compile`` (inductor fuses the add itself) and CPU tensors use ``F.conv2d``.
"""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ._checks import autocast_dtype

try:
    import triton
    import triton.language as tl

    from ._triton_common import CallCache, KernelCall
except ImportError:  # triton ships with torch's Linux builds only
    triton = None

_SUPPORTED = (torch.float16, torch.bfloat16, torch.float32)
_BACKENDS = ("auto", "torch", "triton")
_TILE_ELEMENTS = 2048  # positions x channels per program


# A Python op (Triton launches, an autograd.Function): scripted models call it as Python (TorchScript
# drops an ignored function's defaults, so scripted callers pass every argument).
@torch.jit.ignore
def depthwise_conv2d_nhwc(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                          residual: Optional[torch.Tensor] = None, backend: str = "auto") -> torch.Tensor:
    """``residual + conv2d(x, weight, bias, padding=k // 2, groups=C)`` on channels-last maps.

    Args:
        x: ``[B, H, W, C]`` (any strides, e.g. a slice of a projection).
        weight: ``[C, 1, kh, kw]`` (an ``nn.Conv2d(C, C, k, padding=k // 2, groups=C)``'s), odd
            ``kh`` / ``kw``: stride 1, dilation 1, zero padding to the same size.
        bias: ``[C]`` or None; residual: ``[B, H, W, C]`` added to the result, or None.
        backend: ``"torch"`` (``F.conv2d`` and an add), ``"triton"`` (the fused Triton forward and
            cuDNN's backward; on CPU only under ``TRITON_INTERPRET=1``, with ATen's backward) or
            ``"auto"``: triton for CUDA tensors of fp16 / bf16 / fp32 outside ``torch.compile``,
            else ``"torch"``.

    Returns: ``[B, H, W, C]`` contiguous. Under autocast the conv runs in the autocast dtype, as
    ``nn.Conv2d`` does (inputs, weight and bias rounded to it, the result rounded to it; so does
    the backward), and the sum has the promoted dtype of ``residual`` and the conv.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"depthwise_conv2d_nhwc: unknown backend {backend!r}; expected one of {_BACKENDS}")
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"depthwise_conv2d_nhwc: x must be a [B, H, W, C] map, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    C = x.shape[-1]
    if weight.dim() != 4 or weight.shape[:2] != (C, 1) or weight.shape[2] % 2 == 0 or weight.shape[3] % 2 == 0:
        raise ValueError(f"depthwise_conv2d_nhwc: weight must be [C, 1, kh, kw] with C = {C} and odd kh, kw "
                         f"(a depthwise conv with 'same' padding), got {tuple(weight.shape)}")
    if bias is not None and bias.shape != (C,):
        raise ValueError(f"depthwise_conv2d_nhwc: bias must have shape ({C},), got {tuple(bias.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"depthwise_conv2d_nhwc: residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    dtypes_ok = x.dtype in _SUPPORTED and (residual is None or residual.dtype in _SUPPORTED)
    if backend == "auto":
        backend = "triton" if triton is not None and x.is_cuda and dtypes_ok and not torch.compiler.is_compiling() else "torch"
    if backend == "torch":
        kh, kw = weight.shape[2:]
        out = F.conv2d(x.permute(0, 3, 1, 2), weight, bias, padding=(kh // 2, kw // 2), groups=C).permute(0, 2, 3, 1)
        return out if residual is None else residual + out
    if triton is None:
        raise RuntimeError("depthwise_conv2d_nhwc backend 'triton' needs the triton package")
    if not dtypes_ok:
        raise ValueError(f"depthwise_conv2d_nhwc backend 'triton' takes fp16 / bf16 / fp32 maps, got x {x.dtype}"
                         + ("" if residual is None else f" and residual {residual.dtype}"))
    device = x.device.type
    conv_dtype = autocast_dtype(device)
    if conv_dtype is None:
        if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
            raise ValueError(f"depthwise_conv2d_nhwc: x ({x.dtype}), weight ({weight.dtype}) and bias must share one "
                             f"dtype outside autocast, as for F.conv2d")
        conv_dtype = x.dtype
    weight = weight if weight.is_contiguous() else weight.contiguous()
    with torch.autocast(device, enabled=False):
        return _DepthwiseConvFunction.apply(x, weight, bias, residual, conv_dtype)


def depthwise_conv_forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                           residual: Optional[torch.Tensor], conv_dtype: torch.dtype) -> torch.Tensor:
    """The Triton forward of :func:`depthwise_conv2d_nhwc` (arguments checked, ``weight``
    contiguous, autocast resolved into ``conv_dtype``): ``[B, H, W, C]`` in ``conv_dtype``, or
    with ``residual`` in the promoted dtype of the two."""
    out_dtype = conv_dtype if residual is None else torch.promote_types(residual.dtype, conv_dtype)
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    res = residual if residual is not None else out
    key = ("fwd", x.shape, x.stride(), res.stride(), tuple(weight.shape[2:]), bias is not None,
           residual is not None, conv_dtype, x.device)
    _CALLS.get(key, lambda: _conv_call(x, res, out, tuple(weight.shape[2:]), bias is not None,
                                       residual is not None, conv_dtype))(
        x, weight, bias if bias is not None else weight, res, out)
    return out


def depthwise_conv_backward(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, has_bias: bool,
                            conv_dtype: torch.dtype, residual_dtype: Optional[torch.dtype],
                            needs: Tuple[bool, bool, bool, bool] = (True, True, True, True)
                            ) -> Tuple[Optional[torch.Tensor], ...]:
    """``(grad_x, grad_weight, grad_bias, grad_residual)`` of :func:`depthwise_conv_forward`, each
    in its input's dtype; ``needs`` says which to compute (``None`` for the others, and for the
    bias and residual gradients of calls without them)."""
    C, kh, kw = weight.shape[0], weight.shape[2], weight.shape[3]
    need_x, need_w, need_b, need_res = needs
    need_b = need_b and has_bias
    dx = dw = db = dres = None
    if need_x or need_w or need_b:
        # In the conv dtype, as autocast's conv would run it (its add hands the conv output's
        # gradient down rounded to that dtype), on the NCHW views of the channels-last maps.
        gx, gw, gb = torch.ops.aten.convolution_backward(
            grad_out.to(conv_dtype).permute(0, 3, 1, 2), x.to(conv_dtype).permute(0, 3, 1, 2),
            weight.to(conv_dtype), [C] if has_bias else None, [1, 1], [kh // 2, kw // 2], [1, 1], False, [0, 0], C,
            [need_x, need_w, need_b])
        dx = gx.permute(0, 2, 3, 1).to(x.dtype) if need_x else None
        dw = gw.to(weight.dtype) if need_w else None
        db = gb.to(weight.dtype) if need_b else None
    if need_res and residual_dtype is not None:
        dres = grad_out if grad_out.dtype == residual_dtype else grad_out.to(residual_dtype)
    return dx, dw, db, dres


class _DepthwiseConvFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, residual, conv_dtype):
        ctx.save_for_backward(x, weight)
        ctx.has_bias, ctx.conv_dtype = bias is not None, conv_dtype
        ctx.residual_dtype = None if residual is None else residual.dtype
        return depthwise_conv_forward(x, weight, bias, residual, conv_dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grads = depthwise_conv_backward(grad_out, x, weight, ctx.has_bias, ctx.conv_dtype, ctx.residual_dtype,
                                        tuple(ctx.needs_input_grad[:4]))
        return (*grads, None)


def _tiles(C: int) -> Tuple[int, int]:
    block_c = min(64, triton.next_power_of_2(C))
    return max(1, _TILE_ELEMENTS // block_c), block_c


def _conv_call(x: torch.Tensor, res: torch.Tensor, out: torch.Tensor, kernel: Tuple[int, int], has_bias: bool,
               has_residual: bool, conv_dtype: torch.dtype) -> KernelCall:
    B, H, W, C = x.shape
    block_p, block_c = _tiles(C)
    return KernelCall(_dwconv_kernel, (triton.cdiv(B * H * W, block_p), triton.cdiv(C, block_c)),
                      (*x.stride(), *res.stride(), H, W, C, B * H * W),
                      dict(KH=kernel[0], KW=kernel[1], HAS_BIAS=has_bias, HAS_RESIDUAL=has_residual,
                           CONV_DTYPE=_TL_DTYPES[conv_dtype], BLOCK_P=block_p, BLOCK_C=block_c))


# The launches of each call signature.
_CALLS = CallCache() if triton is not None else None


if triton is not None:
    _TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}

    @triton.jit
    def _dwconv_kernel(X, Wt, Bias, Res, Out, s_xb, s_xh, s_xw, s_xc, s_rb, s_rh, s_rw, s_rc, H, W, C, P,
                       KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                       CONV_DTYPE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        # out[p, c] = res[p, c] + round(bias[c] + sum_taps w[c, i, j] x[p + (i, j) - pad, c]) over a
        # [BLOCK_P positions, BLOCK_C channels] tile. Operands are rounded to CONV_DTYPE first and
        # accumulated in fp32.
        p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        p_ok = p < P
        c_ok = c < C
        b = (p // (H * W)).to(tl.int64)
        y = (p // W) % H
        x = p % W
        acc = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
        for i in tl.static_range(KH):
            yy = y + i - KH // 2
            for j in tl.static_range(KW):
                xx = x + j - KW // 2
                ok = p_ok & (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W)
                w = tl.load(Wt + c * (KH * KW) + i * KW + j, mask=c_ok, other=0.0).to(CONV_DTYPE).to(tl.float32)
                v = tl.load(X + (b * s_xb + yy * s_xh + xx * s_xw)[:, None] + c[None, :] * s_xc,
                            mask=ok[:, None] & c_ok[None, :], other=0.0)
                acc += v.to(CONV_DTYPE).to(tl.float32) * w[None, :]
        if HAS_BIAS:
            acc += tl.load(Bias + c, mask=c_ok, other=0.0).to(CONV_DTYPE).to(tl.float32)[None, :]
        result = acc.to(CONV_DTYPE).to(tl.float32)
        mask = p_ok[:, None] & c_ok[None, :]
        if HAS_RESIDUAL:
            result += tl.load(Res + (b * s_rb + y * s_rh + x * s_rw)[:, None] + c[None, :] * s_rc,
                              mask=mask, other=0.0).to(tl.float32)
        tl.store(Out + p[:, None].to(tl.int64) * C + c[None, :], result.to(Out.dtype.element_ty), mask=mask)
