"""Pieces shared by the Triton backends: what they support, their fp32-aware dot, and a launch
path with little host time per call."""
from __future__ import annotations

import os
from typing import Callable, Dict, Hashable, Optional, Sequence, Tuple, TypeVar

import torch
import triton
import triton.language as tl
from triton.runtime.driver import driver

try:
    from triton import knobs as _knobs
except ImportError:  # triton < 3.4: its launcher's argument list differs, KernelCall uses JITFunction.run
    _knobs = None

LOG2E = 1.4426950408889634
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
MAX_GRID_YZ = 65535


def interpreting() -> bool:
    """Whether Triton runs in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def unsupported_reason(q: torch.Tensor, v: torch.Tensor) -> Optional[str]:
    """Why the Triton kernels cannot run an attention call on ``q`` / ``v``, or ``None`` when they can."""
    return unsupported_reason_for(q.dtype, q.device, q.shape[0] * q.shape[-2], q.shape[-1], v.shape[-1])


def unsupported_reason_for(dtype: torch.dtype, device: torch.device, batch_heads: int, head_dim: int,
                           v_head_dim: int) -> Optional[str]:
    """:func:`unsupported_reason` of a call described by its ``q`` dtype and device, batch x heads
    and the head dims of ``q`` and ``v`` (for callers deciding before the tensors exist)."""
    if dtype not in SUPPORTED_DTYPES:
        return f"dtype {dtype} (supported: float16, bfloat16, float32)"
    if v_head_dim != head_dim:
        return f"v head_dim {v_head_dim} != q head_dim {head_dim}"
    if head_dim > MAX_HEAD_DIM:
        return f"head_dim {head_dim} > {MAX_HEAD_DIM}"
    if batch_heads > MAX_GRID_YZ:
        # The kernels put (batch, head) on grid axis 1, which CUDA caps.
        return f"batch x heads = {batch_heads} > {MAX_GRID_YZ} (CUDA's limit on grid axis 1)"
    if device.type != "cuda" and not interpreting():
        return f"{device} tensors (the kernels need CUDA, or TRITON_INTERPRET=1 on CPU)"
    if device.type != "cuda" and dtype == torch.bfloat16:
        # The CPU interpreter's bf16 matrix products are wrong (errors of ~1e9 relative), not slow.
        return "bfloat16 CPU tensors under TRITON_INTERPRET=1 (its bfloat16 arithmetic is wrong; use float16 / float32)"
    return None


Config = TypeVar("Config")


def fastest(candidates: Sequence[Config], launch: Callable[[Config], None]) -> Tuple[Config, Dict[Config, float]]:
    """The candidate whose ``launch`` takes the least GPU time (median ms by ``triton.testing.do_bench``)
    and every candidate's time; the first candidate, untimed, under ``TRITON_INTERPRET=1`` (which
    cannot time kernels) or with ``VISATTN_AUTOTUNE=0``. Candidates that run out of resources are
    skipped (a ``RuntimeError`` when all do); ``launch`` must be safe to repeat."""
    if interpreting() or os.environ.get("VISATTN_AUTOTUNE", "1") == "0":
        return candidates[0], {}
    import triton.testing

    # Two rounds, each candidate's best median kept: an idle GPU clocks up during the first
    # timings (seen on the H200: the first candidate measured up to 2x slow), which would
    # otherwise count against whichever candidate comes first.
    timings: Dict[Config, float] = {}
    refused = set()
    for _ in range(2):
        for cfg in candidates:
            if cfg in refused:
                continue
            try:
                ms = triton.testing.do_bench(lambda: launch(cfg), warmup=5, rep=20, return_mode="median")
            except triton.runtime.errors.OutOfResources:
                refused.add(cfg)
                continue
            timings[cfg] = min(ms, timings.get(cfg, ms))
    if not timings:
        raise RuntimeError(f"none of the {len(candidates)} Triton launch candidates fits this GPU's resources "
                           f"(registers / shared memory): {list(candidates)}")
    return min(timings, key=timings.get), timings


class Tuner:
    """The fastest launch candidate per key, timed once on the GPU (:func:`fastest`): ``best``
    maps keys to the picked candidates and ``timings`` to every candidate's milliseconds (read by
    the benchmarks and tools/tune_na.py). An untimed pick (the interpreter, ``VISATTN_AUTOTUNE=0``)
    is the first candidate and is not remembered, so a later call may tune."""

    def __init__(self) -> None:
        self.best: Dict[Hashable, object] = {}
        self.timings: Dict[Hashable, Dict[object, float]] = {}

    def pick(self, key: Hashable, candidates: Sequence[Config], launch: Callable[[Config], None]) -> Config:
        if key not in self.best:
            best, timings = fastest(candidates, launch)
            if not timings:
                return best
            self.timings[key], self.best[key] = timings, best
        return self.best[key]


@triton.jit
def dot(a, b, IEEE: tl.constexpr, acc=None):
    """``acc + a @ b`` accumulated in fp32 (``acc`` None: 0); full-precision (not TF32) products
    for fp32 inputs."""
    if IEEE:
        return tl.dot(a, b, acc=acc, input_precision="ieee", out_dtype=tl.float32)
    return tl.dot(a, b, acc=acc, out_dtype=tl.float32)


def _active_hook(name: str):
    # Launch hooks (set by profilers such as proton): a hook chain that is empty when none is set
    # (triton >= 3.5), or None / a callable.
    hook = getattr(_knobs.runtime, name)
    if hook is None or not getattr(hook, "calls", True):
        return None
    return hook


class KernelCall:
    """One launch of a Triton kernel with every scalar argument and constexpr fixed.

    ``call(*tensors)`` runs ``kernel[grid](*tensors, *scalars, **meta)``. ``JITFunction.run``
    binds, specializes and hashes every argument on every call (20-70 µs of host time per op call
    on the H200 machine's host for these kernels of ~40 arguments, ``visattn bench launch``: more
    than many of their GPU times); here the scalars are fixed, so what can change the compiled
    specialization between calls is only what Triton specializes tensors on, their dtypes and
    16-byte alignment, and the current device. The first call with a new such signature goes
    through ``JITFunction.run`` (which compiles or finds the kernel and launches it); later ones
    call the compiled kernel's launcher directly.

    Args:
        kernel: a ``@triton.jit`` function whose parameters are the tensors, then ``scalars``, then
            the constexprs (given in ``meta`` or left at their defaults; ``meta`` may also hold
            ``num_warps`` / ``num_stages`` / ``maxnreg``).
        grid: 1 to 3 program counts.
    """

    __slots__ = ("kernel", "grid", "scalars", "meta", "_compiled")
    # False sends every call through JITFunction.run (``visattn bench launch`` times both).
    direct = True

    def __init__(self, kernel: triton.runtime.JITFunction, grid: Tuple[int, ...], scalars: tuple,
                 meta: Dict[str, object]):
        if not 1 <= len(grid) <= 3:
            raise ValueError(f"grid must have 1 to 3 program counts, got {grid}")
        self.kernel, self.grid, self.scalars, self.meta = kernel, tuple(grid) + (1,) * (3 - len(grid)), scalars, meta
        self._compiled: Dict[tuple, tuple] = {}

    def __call__(self, *tensors: torch.Tensor) -> None:
        if not KernelCall.direct or interpreting() or _knobs is None:
            self.kernel[self.grid](*tensors, *self.scalars, **self.meta)
            return
        device = driver.active.get_current_device()
        signature = (device,) + tuple((t.dtype, t.data_ptr() % 16 == 0) for t in tensors)
        entry = self._compiled.get(signature)
        if entry is None:
            compiled = self.kernel[self.grid](*tensors, *self.scalars, **self.meta)
            constexprs = tuple(self.meta[p.name] if p.name in self.meta else p.default
                               for p in self.kernel.params[len(tensors) + len(self.scalars):])
            self._compiled[signature] = (compiled, constexprs)
            return
        compiled, constexprs = entry
        stream = driver.active.get_current_stream(device)
        args = tensors + self.scalars + constexprs
        enter, leave = _active_hook("launch_enter_hook"), _active_hook("launch_exit_hook")
        metadata = compiled.launch_metadata(self.grid, stream, *args) if enter is not None else None
        compiled.run(*self.grid, stream, compiled.function, compiled.packed_metadata, metadata, enter, leave, *args)


class CallCache:
    """Launches (or groups of them) by call signature, so that a repeated call (every training
    step) costs one dict lookup on the host instead of re-deriving grids, strides and constexprs."""

    def __init__(self, max_entries: int = 4096):
        self.max_entries = max_entries
        self.entries: Dict[Hashable, object] = {}

    def get(self, key: Hashable, build: Callable[[], object]) -> object:
        entry = self.entries.get(key)
        if entry is None:
            if len(self.entries) >= self.max_entries:
                self.entries.clear()
            entry = self.entries[key] = build()
        return entry
