"""``visattn bench routed``: BiFormer's bi-level routing attention, fused kernels against the gather.

In one process, on the same bf16 inputs, a ``BiLevelRoutingAttention`` layer (projections, routing,
attention, LePE, output) at BiFormer-S stage 1-3 shapes, 224 px (n_win 7) and 512 px (n_win 8),
runs on (a) visattn's Triton routed-attention kernels, which read K/V in place, and (b) the
``gather`` backend, a port of the official code (``topk`` copies of K/V per query region, computed
in the inputs' dtype as the official layer is). Forward and forward+backward medians and peak memory; prints a table, writes JSON and a
PNG chart.
"""
from __future__ import annotations

import argparse
import datetime
from dataclasses import asdict, dataclass
from typing import Dict, List

import torch

from visattn.bench.common import (
    device_name, format_table, peak_extra_bytes, require_cuda, save_results, select_shapes, time_ms,
)
from visattn.layers import BiLevelRoutingAttention


@dataclass(frozen=True)
class BRAShape:
    name: str
    batch: int
    size: int
    dim: int
    heads: int
    n_win: int
    topk: int


SHAPES = [
    BRAShape("s-224-stage1", 64, 56, 64, 2, 7, 1),
    BRAShape("s-224-stage2", 64, 28, 128, 4, 7, 4),
    BRAShape("s-224-stage3", 64, 14, 256, 8, 7, 16),
    BRAShape("s-512-stage1", 16, 128, 64, 2, 8, 1),
    BRAShape("s-512-stage2", 16, 64, 128, 4, 8, 4),
    BRAShape("s-512-stage3", 16, 32, 256, 8, 8, 16),
]
BACKENDS = ["triton", "gather"]


def bench_shape(shape: BRAShape, dtype: torch.dtype) -> List[Dict[str, object]]:
    torch.manual_seed(0)
    layer = BiLevelRoutingAttention(shape.dim, shape.heads, shape.n_win, shape.dim, shape.topk).cuda().to(dtype)
    x = torch.randn(shape.batch, shape.size, shape.size, shape.dim, device="cuda", dtype=dtype, requires_grad=True)
    grad = torch.randn_like(x)
    rows = []
    outputs = {}
    for mode in ("fwd", "fwd+bwd"):
        row: Dict[str, object] = {"shape": shape.name, "mode": mode, "ms": {}, "peak_bytes": {}}
        for backend in BACKENDS:
            layer.backend = backend
            if mode == "fwd":
                def fn():
                    with torch.no_grad():
                        return layer(x)
                outputs[backend] = fn().float()
            else:
                def fn():
                    layer(x).backward(grad)
            row["ms"][backend] = time_ms(fn, grad_to_none=[x, *layer.parameters()] if mode != "fwd" else None)
            x.grad = None
            layer.zero_grad(set_to_none=True)
            row["peak_bytes"][backend] = peak_extra_bytes(fn)
            x.grad = None
            layer.zero_grad(set_to_none=True)
        rows.append(row)
    rows[0]["max_abs_diff"] = (outputs["triton"] - outputs["gather"]).abs().max().item()
    return rows


def summarize(rows: List[Dict[str, object]]) -> str:
    table = []
    for row in rows:
        ms, peak = row["ms"], row["peak_bytes"]
        table.append({
            "shape": row["shape"], "mode": row["mode"],
            "triton ms": f"{ms['triton']:.3f}", "gather ms": f"{ms['gather']:.3f}",
            "speedup": f"{ms['gather'] / ms['triton']:.2f}x",
            "triton peak MiB": f"{peak['triton'] / 2**20:.0f}", "gather peak MiB": f"{peak['gather'] / 2**20:.0f}",
            "peak ratio": f"{peak['triton'] / max(1, peak['gather']):.2f}",
            "max |diff|": f"{row['max_abs_diff']:.1e}" if "max_abs_diff" in row else "",
        })
    return format_table(table, list(table[0]))


def plot(rows: List[Dict[str, object]], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(14, 4.5))
    for ax, mode in zip(axes, ("fwd", "fwd+bwd")):
        mode_rows = [r for r in rows if r["mode"] == mode]
        xs = range(len(mode_rows))
        for i, backend in enumerate(BACKENDS):
            ax.bar([x + 0.4 * i for x in xs], [r["ms"][backend] for r in mode_rows], 0.4,
                   label="gather (official algorithm)" if backend == "gather" else "visattn triton")
        ax.set_xticks([x + 0.2 for x in xs])
        ax.set_xticklabels([r["shape"] for r in mode_rows], rotation=20, ha="right", fontsize=8)
        ax.set_ylabel("ms (median)")
        ax.set_title(mode)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run(shapes: List[BRAShape], out_dir: str, dtype: torch.dtype = torch.bfloat16) -> Dict[str, object]:
    require_cuda()
    rows = []
    for shape in shapes:
        rows.extend(bench_shape(shape, dtype))
        print(summarize(rows[-2:]), flush=True)
    payload = {
        "device": device_name(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__, "dtype": str(dtype).replace("torch.", ""),
        "shapes": [asdict(s) for s in shapes], "rows": rows,
    }
    title = f"bi-level routing attention layer, {payload['dtype']}, {payload['device']}, {payload['date']}"
    save_results(out_dir, "routed", payload, lambda path: plot(rows, path, title))
    print(title)
    print(summarize(rows))
    return payload


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shapes", nargs="+", metavar="NAME", help=f"subset of {[s.name for s in SHAPES]}")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--out", default="benchmarks/results", help="folder for routed.json and routed.png")


def main(args: argparse.Namespace) -> int:
    shapes = select_shapes(SHAPES, args.shapes)
    run(shapes, args.out, getattr(torch, args.dtype))
    return 0
