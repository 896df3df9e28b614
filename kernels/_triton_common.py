"""Pieces shared by the Triton backends: what they support, and their fp32-aware dot."""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


def interpreting() -> bool:
    """Whether Triton runs in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def unsupported_reason(q: torch.Tensor, v: torch.Tensor) -> Optional[str]:
    """Why the Triton kernels cannot run an attention call on ``q`` / ``v``, or ``None`` when they can."""
    if q.dtype not in SUPPORTED_DTYPES:
        return f"dtype {q.dtype} (supported: float16, bfloat16, float32)"
    if v.shape[-1] != q.shape[-1]:
        return f"v head_dim {v.shape[-1]} != q head_dim {q.shape[-1]}"
    if q.shape[-1] > MAX_HEAD_DIM:
        return f"head_dim {q.shape[-1]} > {MAX_HEAD_DIM}"
    if not q.is_cuda and not interpreting():
        return f"{q.device} tensors (the kernels need CUDA, or TRITON_INTERPRET=1 on CPU)"
    return None


@triton.jit
def dot(a, b, IEEE: tl.constexpr):
    """``a @ b`` accumulated in fp32; full-precision (not TF32) products for fp32 inputs."""
    if IEEE:
        return tl.dot(a, b, input_precision="ieee", out_dtype=tl.float32)
    return tl.dot(a, b, out_dtype=tl.float32)
