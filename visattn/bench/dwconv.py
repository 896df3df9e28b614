"""``visattn bench dwconv``: the fused depthwise conv + residual against ``nn.Conv2d`` and an add.

In one process, on the same bf16-autocast inputs, ``residual + dwconv(x)`` on channels-last maps
at the sizes of BiFormer-S's position convs (3x3 on the block input, fp32 residual) and LePE
(5x5 on V sliced from the qkv projection, bf16 residual), batch 128 at 224 px, runs as

* ``triton``: :func:`visattn.kernels.depthwise_conv2d_nhwc` on its Triton kernels;
* ``torch``: the same op on its ``torch`` backend, ``F.conv2d`` (cuDNN) on the NCHW view and an
  add: what ``nn.Conv2d`` in the block costs.

Forward and forward+backward medians, eager (host launch overhead included) and replayed from a
CUDA graph (GPU time alone), and the largest difference of the outputs. Prints a table, writes JSON.
"""
from __future__ import annotations

import argparse
import datetime
import os
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional

import torch

from visattn.bench.common import device_name, format_table, graph_time_ms, require_cuda, select_shapes, time_ms, write_json
from visattn.kernels import depthwise_conv2d_nhwc


@dataclass(frozen=True)
class ConvShape:
    name: str
    batch: int
    size: int
    channels: int
    kernel: int
    lepe: bool  # x sliced from a qkv map, bf16 residual; else x is the fp32 block input and residual


SHAPES = [
    ConvShape("pos-s1", 128, 56, 64, 3, False),
    ConvShape("lepe-s1", 128, 56, 64, 5, True),
    ConvShape("pos-s2", 128, 28, 128, 3, False),
    ConvShape("lepe-s2", 128, 28, 128, 5, True),
    ConvShape("pos-s3", 128, 14, 256, 3, False),
    ConvShape("lepe-s3", 128, 14, 256, 5, True),
]
COMPETITORS = ["triton", "torch"]


def _inputs(shape: ConvShape) -> List[torch.Tensor]:
    B, S, C, k = shape.batch, shape.size, shape.channels, shape.kernel
    weight = (torch.randn(C, 1, k, k, device="cuda") * 0.2).requires_grad_()
    bias = torch.randn(C, device="cuda").requires_grad_()
    if shape.lepe:
        x = torch.randn(B, S, S, 3 * C, device="cuda", dtype=torch.bfloat16)[..., 2 * C:].requires_grad_()
        residual = torch.randn(B, S, S, C, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        return [x, weight, bias, residual]
    x = torch.randn(B, S, S, C, device="cuda", requires_grad=True)
    return [x, weight, bias, x]


def _step(inputs: List[torch.Tensor], backend: str, mode: str) -> Callable[[], object]:
    x, weight, bias, residual = inputs
    grad = torch.randn(x.shape, device="cuda", dtype=residual.dtype)
    leaves = list(dict.fromkeys(inputs))

    def forward() -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return depthwise_conv2d_nhwc(x, weight, bias, residual, backend=backend)

    if mode == "fwd":
        return lambda: forward()
    return lambda: torch.autograd.grad(forward(), leaves, grad)


def run(shapes: List[ConvShape], out_dir: Optional[str]) -> Dict[str, object]:
    require_cuda()
    rows = []
    for shape in shapes:
        inputs = _inputs(shape)
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):  # no graph kept alive to capture beside
            outs = {b: depthwise_conv2d_nhwc(*inputs, backend=b).float() for b in COMPETITORS}
        diff = (outs["triton"] - outs["torch"]).abs().max().item()
        for mode in ("fwd", "fwd+bwd"):
            row = {"shape": shape.name, "mode": mode, "ms": {}, "graph_ms": {}}
            for backend in COMPETITORS:
                step = _step(inputs, backend, mode)
                row["ms"][backend] = time_ms(step)
                row["graph_ms"][backend] = graph_time_ms(step)
            if mode == "fwd":
                row["max_abs_diff"] = diff
            rows.append(row)
    payload = {
        "device": device_name(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__, "dtype": "bfloat16 autocast", "shapes": [asdict(s) for s in shapes], "rows": rows,
    }
    table = [{
        "shape": r["shape"], "mode": r["mode"],
        **{f"{b} eager ms": f"{r['ms'][b]:.3f}" for b in COMPETITORS},
        "eager speedup": f"{r['ms']['torch'] / r['ms']['triton']:.2f}x",
        **{f"{b} graph ms": f"{r['graph_ms'][b]:.3f}" for b in COMPETITORS},
        "graph speedup": f"{r['graph_ms']['torch'] / r['graph_ms']['triton']:.2f}x",
        "max |diff|": f"{r['max_abs_diff']:.1e}" if "max_abs_diff" in r else "",
    } for r in rows]
    print(f"depthwise conv + residual, bf16 autocast, {payload['device']}, {payload['date']}")
    print(format_table(table, list(table[0])))
    if out_dir:
        write_json(os.path.join(out_dir, "dwconv.json"), payload)
    return payload


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shapes", nargs="+", metavar="NAME", help=f"subset of {[s.name for s in SHAPES]}")
    parser.add_argument("--out", default="benchmarks/results", help="folder for dwconv.json ('' for none)")


def main(args: argparse.Namespace) -> int:
    run(select_shapes(SHAPES, args.shapes), args.out)
    return 0
