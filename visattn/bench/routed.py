"""``visattn bench routed``: BiFormer's bi-level routing attention, fused kernels against the official layer.

In one process, on the same bf16 inputs and weights, a bi-level routing attention layer
(projections, routing, attention, LePE, output) at BiFormer-S stage 1-3 shapes, 224 px (n_win 7)
and 512 px (n_win 8), runs as

* ``triton``: visattn's ``BiLevelRoutingAttention`` on the Triton routed-attention kernels, which
  read K / V in place;
* ``gather``: the same visattn layer on the ``gather`` backend (the official attention algorithm,
  ``topk`` copies of K / V per query region, in the inputs' dtype);
* ``official``: :class:`~visattn.bench.biformer_official_port.OfficialBRAPort`, the official
  layer's op sequence (its window rearranges and copies, ``torch.gather``, explicit attention).

Forward and forward+backward medians, both eager (what a training loop sees, host launch overhead
included) and replayed from a CUDA graph (the kernels' GPU time alone), and the eager peak memory;
speedups are against the official port. Prints a table, writes JSON and a PNG chart.
"""
from __future__ import annotations

import argparse
import datetime
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List

import torch

from visattn.bench.biformer_official_port import OfficialBRAPort
from visattn.bench.common import (
    device_name, format_table, graph_time_ms, peak_extra_bytes, require_cuda, save_results, select_shapes, time_ms,
)
from visattn.kernels import triton_routed
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
COMPETITORS = ["triton", "gather", "official"]
BASELINE = "official"
TIMINGS = ("eager", "graph")


def _step(layer: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor, mode: str) -> Callable[[], object]:
    if mode == "fwd":
        def fwd():
            with torch.no_grad():
                return layer(x)
        return fwd

    def fwd_bwd():
        layer(x).backward(grad)
    return fwd_bwd


def bench_shape(shape: BRAShape, dtype: torch.dtype) -> List[Dict[str, object]]:
    torch.manual_seed(0)
    layer = BiLevelRoutingAttention(shape.dim, shape.heads, shape.n_win, shape.dim, shape.topk).cuda().to(dtype)
    port = OfficialBRAPort.from_visattn(layer)
    x = torch.randn(shape.batch, shape.size, shape.size, shape.dim, device="cuda", dtype=dtype, requires_grad=True)
    grad = torch.randn_like(x)
    rows = []
    outputs = {}
    tuned_before = set(triton_routed.DKDV_TUNER.timings)
    for mode in ("fwd", "fwd+bwd"):
        row: Dict[str, object] = {"shape": shape.name, "mode": mode, "ms": {}, "graph_ms": {}, "peak_bytes": {}}
        for name in COMPETITORS:
            module = port if name == "official" else layer
            if name != "official":
                layer.backend = name
            fn = _step(module, x, grad, mode)
            if mode == "fwd":
                outputs[name] = fn().float()
            params = [x, *module.parameters()]
            row["ms"][name] = time_ms(fn, grad_to_none=params if mode != "fwd" else None)
            for p in params:
                p.grad = None
            row["peak_bytes"][name] = peak_extra_bytes(fn)
            row["graph_ms"][name] = graph_time_ms(fn)
            for p in params:
                p.grad = None
        if mode == "fwd+bwd":  # the dK / dV launch the tuner picked for this shape, and its candidates' ms
            row["dkdv_candidate_ms"] = {str(cfg): ms for key, timings in triton_routed.DKDV_TUNER.timings.items()
                                 if key not in tuned_before for cfg, ms in timings.items()}
        rows.append(row)
    rows[0]["max_abs_diff"] = {name: (outputs["triton"] - outputs[name]).abs().max().item() for name in ("gather", "official")}
    return rows


def summarize(rows: List[Dict[str, object]]) -> str:
    table = []
    for row in rows:
        entry = {"shape": row["shape"], "mode": row["mode"]}
        for timing, key in zip(TIMINGS, ("ms", "graph_ms")):
            ms = row[key]
            for name in COMPETITORS:
                entry[f"{name} {timing} ms"] = f"{ms[name]:.3f}"
            entry[f"{timing} speedup"] = f"{ms[BASELINE] / ms['triton']:.2f}x"
        peak = row["peak_bytes"]
        for name in COMPETITORS:
            entry[f"{name} MiB"] = f"{peak[name] / 2**20:.0f}"
        entry["peak ratio"] = f"{peak['triton'] / max(1, peak[BASELINE]):.2f}"
        diff = row.get("max_abs_diff")
        entry["max |diff|"] = f"{max(diff.values()):.1e}" if diff else ""
        table.append(entry)
    return format_table(table, list(table[0]))


def plot(rows: List[Dict[str, object]], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {"triton": "visattn triton", "gather": "visattn layer, gather backend", "official": "official layer (port)"}
    fig, axes = plt.subplots(2, 2, figsize=(15, 8))
    for col, mode in enumerate(("fwd", "fwd+bwd")):
        mode_rows = [r for r in rows if r["mode"] == mode]
        xs = range(len(mode_rows))
        for ax, timing, key in zip(axes[:, col], TIMINGS, ("ms", "graph_ms")):
            width = 0.8 / len(COMPETITORS)
            for i, name in enumerate(COMPETITORS):
                ax.bar([x + width * i for x in xs], [r[key][name] for r in mode_rows], width, label=labels[name])
            ax.set_xticks([x + 0.4 - width / 2 for x in xs])
            ax.set_xticklabels([r["shape"] for r in mode_rows], rotation=20, ha="right", fontsize=8)
            ax.set_ylabel("ms (median)")
            ax.set_title(f"{mode}, {timing}")
    axes[0, 0].legend(fontsize=8)
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
