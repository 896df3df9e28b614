"""``visattn bench launch``: host time per call of visattn's Triton ops.

A model's eager training step is limited by the host whenever the host issues its kernels more
slowly than the GPU runs them (DiNAT-T at batch 128 on an H200: about 100 ms of host work for 57 ms
of kernels). This benchmark measures, on inputs small enough that the GPU is never the limit, the
wall time per call of each Triton op (LayerNorm, neighborhood attention, routed attention; forward
and forward+backward) with its kernels launched directly (:class:`visattn.kernels._triton_common.KernelCall`,
the default) and through ``JITFunction.run`` on every call, beside the PyTorch op it replaces
(``F.layer_norm``) and one ATen elementwise op. Prints a table of microseconds per call and the
ratio jit / direct (medians of repeats that alternate the two paths), and writes JSON.
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from visattn.bench.common import device_name, format_table, require_cuda, wall_ms, write_json
from visattn.kernels import na2d, routed_attention_2d
from visattn.kernels._triton_common import KernelCall
from visattn.kernels.layer_norm import layer_norm


def host_us(fn: Callable[[], object], calls: int = 200) -> float:
    """Mean wall-clock microseconds of ``calls`` calls of ``fn`` (after 10 unmeasured ones)."""
    for _ in range(10):
        fn()
    return wall_ms(fn, calls) * 1e3


def median_host_us(fn: Callable[[], object], launch_paths: Sequence[bool], repeats: int = 9) -> List[float]:
    """Median :func:`host_us` of ``fn`` under each launch path (``KernelCall.direct``), the paths
    alternating in every repeat so that drifts of the host's speed hit them alike."""
    samples: Dict[bool, List[float]] = {path: [] for path in launch_paths}
    try:
        for _ in range(repeats):
            for path in launch_paths:
                KernelCall.direct = path
                samples[path].append(host_us(fn))
    finally:
        KernelCall.direct = True
    return [statistics.median(samples[path]) for path in launch_paths]


def _fwd_bwd(fn: Callable[..., torch.Tensor], inputs: List[torch.Tensor]) -> Callable[[], object]:
    def step():
        out = fn(*inputs)
        return torch.autograd.grad(out, inputs, torch.ones_like(out))
    return step


def cases(dtype: torch.dtype) -> Dict[str, Callable[[], object]]:
    """Named calls on small inputs; the ``triton`` ones run under both launch paths."""
    dev = "cuda"
    x = torch.randn(512, 64, device=dev, dtype=dtype, requires_grad=True)
    w = torch.randn(64, device=dev, dtype=dtype, requires_grad=True)
    b = torch.randn(64, device=dev, dtype=dtype, requires_grad=True)
    qkv = torch.randn(1, 14, 14, 3, 2, 32, device=dev, dtype=dtype)
    q, k, v = (t.requires_grad_() for t in qkv.unbind(3))
    rpb = torch.randn(2, 13, 13, device=dev, requires_grad=True)
    index = torch.randint(0, 4, (1, 4, 2), device=dev)
    rq, rk, rv = (torch.randn(1, 16, 16, 2, 32, device=dev, dtype=dtype, requires_grad=True) for _ in range(3))
    y = torch.randn(512, 64, device=dev, dtype=dtype)
    na = lambda q, k, v, rpb: na2d(q, k, v, 7, rpb=rpb, backend="triton")
    routed = lambda q, k, v: routed_attention_2d(q, k, v, index, (2, 2), backend="triton")
    ln = lambda x, w, b: layer_norm(x, w, b, backend="triton")
    return {
        "aten add (reference)": lambda: torch.add(y, y),
        "F.layer_norm fwd": lambda: F.layer_norm(x.detach(), (64,), w.detach(), b.detach()),
        "F.layer_norm fwd+bwd": _fwd_bwd(lambda x, w, b: F.layer_norm(x, (64,), w, b), [x, w, b]),
        "triton layer_norm fwd": lambda: ln(x.detach(), w.detach(), b.detach()),
        "triton layer_norm fwd+bwd": _fwd_bwd(ln, [x, w, b]),
        "triton na2d fwd": lambda: na(q.detach(), k.detach(), v.detach(), rpb.detach()),
        "triton na2d fwd+bwd": _fwd_bwd(na, [q, k, v, rpb]),
        "triton routed_2d fwd": lambda: routed(rq.detach(), rk.detach(), rv.detach()),
        "triton routed_2d fwd+bwd": _fwd_bwd(routed, [rq, rk, rv]),
    }


def run(dtype: torch.dtype, out_dir: Optional[str]) -> Dict[str, object]:
    require_cuda()
    rows = []
    for name, fn in cases(dtype).items():
        row = {"call": name}
        if name.startswith("triton"):
            row["direct_us"], row["jit_us"] = (round(us, 1) for us in median_host_us(fn, (True, False)))
            row["jit/direct"] = round(row["jit_us"] / row["direct_us"], 2)
        else:
            row["direct_us"] = round(median_host_us(fn, (True,))[0], 1)
        rows.append(row)
    payload = {
        "device": device_name(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__, "dtype": str(dtype).replace("torch.", ""), "rows": rows,
    }
    print(f"host microseconds per call, {payload['dtype']}, {payload['device']}, {payload['date']}")
    print(format_table(rows, ["call", "direct_us", "jit_us", "jit/direct"]))
    if out_dir:
        write_json(os.path.join(out_dir, "launch.json"), payload)
    return payload


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--out", default="benchmarks/results", help="folder for launch.json ('' for none)")


def main(args: argparse.Namespace) -> int:
    run(getattr(torch, args.dtype), args.out)
    return 0
