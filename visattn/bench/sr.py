"""``visattn bench sr``: HAT super-resolution, visattn's HAT against a faithful port of the official forward.

In one process, on random weights (seed 0):

1. forward: ``visattn_hat_s_x4`` (HAT-S x4) on a random ``[1, 3, 256, 256]`` batch and
   :class:`~visattn.bench.hat_official_port.OfficialHATPort` built from the same weights (the
   official algorithm: explicit ``q @ k.T`` window attention with the bias gathered through the
   index buffers, ``nn.Unfold`` OCAB). Both run under ``torch.autocast`` in the chosen dtype
   (bf16 by default; the mode ``visattn.sr.upscale(dtype=...)`` uses) with fp32 weights, in
   ``torch.inference_mode``. Median ms, speedup, peak memory on top of the resident weights and
   inputs, and each output's max |diff| from visattn's fp32 output (TF32 off). visattn's output
   counts as the same within bf16 tolerance when its error is at most twice the port's own error,
   or below one 8-bit level (1/255). Target: the port's time / visattn's >= 2.
2. tiled: ``visattn.sr.upscale`` of a random 2048x2048 uint8 image with ``visattn_hat_x4``,
   ``tile=512`` (overlap 32), bf16, and the same with the port: peak CUDA memory
   (``max_memory_allocated``, model weights included; the image and the blended output stay on
   the CPU, as ``upscale`` keeps them on the input's device) and the wall time of the call, after
   one warm-up tile. Target: visattn's peak <= 8 GB (8e9 bytes).

Prints tables and the targets, writes sr.json and a PNG chart (sr.png).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import time
from typing import Dict, Iterator, List, Optional

import numpy as np
import timm
import torch
import torch.nn as nn

from visattn.bench.common import device_name, format_table, peak_extra_bytes, require_cuda, save_results, time_ms
from visattn.bench.hat_official_port import OfficialHATPort
from visattn.models.hat import HAT
from visattn.sr import upscale

RUNNERS = ["visattn", "official port"]
SPEEDUP_TARGET = 2.0
MEMORY_BUDGET_BYTES = 8 * 10**9  # "8 GB"
_UINT8_STEP = 1 / 255


def build(name: str, runner: str) -> nn.Module:
    """``name`` (a visattn HAT, random weights, seed 0) as visattn builds it or as the official port; eval mode, CPU."""
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    if not isinstance(model, HAT):
        raise SystemExit(f"{name} is not a visattn HAT model: the official port exists for HAT only")
    return model if runner == "visattn" else OfficialHATPort.from_visattn(model)


def _autocast(dtype: torch.dtype) -> contextlib.AbstractContextManager:
    return torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32)


@contextlib.contextmanager
def _no_tf32() -> Iterator[None]:
    """Full-precision fp32 matmuls and convs (cuDNN allows TF32 by default), for the reference output."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def bench_forward(name: str, batch: int, size: int, dtype: torch.dtype) -> Dict[str, object]:
    """Forward of visattn's ``name`` and of its official port on a random ``[batch, 3, size, size]``."""
    model = build(name, "visattn").cuda()
    port = OfficialHATPort.from_visattn(model)
    nets = {"visattn": model, "official port": port}
    x = torch.rand(batch, 3, size, size, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with torch.inference_mode(), _no_tf32():
        reference = model(x).float()
        port_fp32 = port(x).float()
    row: Dict[str, object] = {
        "model": name, "input": [batch, 3, size, size], "ms": {}, "peak_bytes": {}, "max_abs_diff_vs_fp32": {},
        # The port and visattn compute the same function: in fp32 they agree to float error.
        "fp32_port_vs_visattn": (port_fp32 - reference).abs().max().item(),
    }
    del port_fp32
    for runner, net in nets.items():
        def fn(net=net):
            with torch.inference_mode(), _autocast(dtype):
                return net(x)
        row["max_abs_diff_vs_fp32"][runner] = (fn().float() - reference).abs().max().item()
        row["ms"][runner] = time_ms(fn)
        row["peak_bytes"][runner] = peak_extra_bytes(fn)
    errors = row["max_abs_diff_vs_fp32"]
    row["speedup"] = row["ms"]["official port"] / row["ms"]["visattn"]
    row["tolerance"] = max(2 * errors["official port"], _UINT8_STEP)
    row["within_tolerance"] = errors["visattn"] <= row["tolerance"]
    return row


def bench_tiled(name: str, image_size: int, tile: int, overlap: int, dtype: torch.dtype,
                runners: List[str]) -> List[Dict[str, object]]:
    """``visattn.sr.upscale`` of a random ``image_size``² uint8 RGB image with each of ``runners``."""
    image = np.random.default_rng(0).integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)
    rows, outputs = [], {}
    for runner in runners:
        net = build(name, runner).cuda()
        upscale(image[:tile, :tile], net, tile=tile, tile_overlap=overlap, dtype=dtype, progress=False)  # warm-up
        torch.cuda.empty_cache()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()  # the peak restarts from what is allocated now: the weights
        start = time.perf_counter()
        outputs[runner] = upscale(image, net, tile=tile, tile_overlap=overlap, dtype=dtype, progress=False)
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated()
        rows.append({
            "model": name, "runner": runner, "image": [image_size, image_size], "tile": tile, "tile_overlap": overlap,
            "peak_bytes": peak, "weights_bytes": sum(p.numel() * p.element_size() for p in net.parameters()),
            "wall_s": wall, "within_budget": peak <= MEMORY_BUDGET_BYTES,
        })
        del net
        torch.cuda.empty_cache()
    if len(outputs) == 2:
        a, b = (outputs[r].astype(np.int16) for r in RUNNERS)
        rows[1]["max_abs_diff_uint8_vs_visattn"] = int(np.abs(a - b).max())
    return rows


def summarize_forward(row: Dict[str, object]) -> str:
    table = [{
        "model": row["model"], "input": "x".join(map(str, row["input"])), "runner": runner,
        "ms": f"{row['ms'][runner]:.2f}",
        "port/visattn": f"{row['speedup']:.2f}x" if runner == "visattn" else "",
        "peak MiB": f"{row['peak_bytes'][runner] / 2**20:.0f}",
        "max |diff| vs fp32": f"{row['max_abs_diff_vs_fp32'][runner]:.1e}",
    } for runner in RUNNERS]
    return format_table(table, list(table[0]))


def summarize_tiled(rows: List[Dict[str, object]]) -> str:
    table = [{
        "model": r["model"], "runner": r["runner"], "image": "x".join(map(str, r["image"])),
        "tile": f"{r['tile']} (overlap {r['tile_overlap']})", "peak GB": f"{r['peak_bytes'] / 1e9:.2f}",
        "weights MB": f"{r['weights_bytes'] / 1e6:.0f}", "wall s": f"{r['wall_s']:.1f}",
        "max |diff| uint8": r.get("max_abs_diff_uint8_vs_visattn", ""),
    } for r in rows]
    return format_table(table, list(table[0]))


def targets(payload: Dict[str, object]) -> List[str]:
    """One line per issue target, PASS or FAIL."""
    verdict = lambda ok: "PASS" if ok else "FAIL"
    fwd = payload["forward"]
    errors = fwd["max_abs_diff_vs_fp32"]
    lines = [
        f"{verdict(fwd['speedup'] >= SPEEDUP_TARGET)} {fwd['model']} {'x'.join(map(str, fwd['input']))} "
        f"{payload['dtype']}: {fwd['speedup']:.2f}x faster than the official port (target >= {SPEEDUP_TARGET:g}x)",
        f"{verdict(fwd['within_tolerance'])} outputs: visattn max |diff| vs fp32 {errors['visattn']:.1e}, official "
        f"port {errors['official port']:.1e}; tolerance {fwd['tolerance']:.1e} (2x the port's error, at least 1/255)",
    ]
    for r in payload["tiled"]:
        if r["runner"] == "visattn":
            lines.append(f"{verdict(r['within_budget'])} {r['model']} {'x'.join(map(str, r['image']))} tile "
                         f"{r['tile']}: peak {r['peak_bytes'] / 1e9:.2f} GB (target <= {MEMORY_BUDGET_BYTES / 1e9:g} GB)")
    return lines


def plot(payload: Dict[str, object], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tiled = payload["tiled"]
    fig, axes = plt.subplots(1, 2 if tiled else 1, figsize=(11 if tiled else 5.5, 4.5), squeeze=False)
    fwd = payload["forward"]
    ax = axes[0][0]
    ax.bar(RUNNERS, [fwd["ms"][r] for r in RUNNERS], color=["C0", "C1"])
    ax.set_ylabel("ms (median)")
    ax.set_title(f"{fwd['model']} forward, {'x'.join(map(str, fwd['input']))}")
    if tiled:
        ax = axes[0][1]
        ax.bar([r["runner"] for r in tiled], [r["peak_bytes"] / 1e9 for r in tiled], color=["C0", "C1"][:len(tiled)])
        ax.axhline(MEMORY_BUDGET_BYTES / 1e9, color="k", linestyle="--", label="8 GB target")
        ax.set_ylabel("peak CUDA memory, GB (weights included)")
        ax.set_title(f"upscale {tiled[0]['model']}, {tiled[0]['image'][0]}² image, tile {tiled[0]['tile']}")
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run(model: str, batch: int, size: int, dtype: torch.dtype, tiled_model: Optional[str], image_size: int,
        tile: int, tile_overlap: int, tiled_runners: List[str], out_dir: str) -> Dict[str, object]:
    require_cuda()
    forward = bench_forward(model, batch, size, dtype)
    print(summarize_forward(forward), flush=True)
    torch.cuda.empty_cache()  # the forward's models are gone: the tiled peaks start from nothing
    tiled = bench_tiled(tiled_model, image_size, tile, tile_overlap, dtype, tiled_runners) if tiled_model else []
    payload = {
        "device": device_name(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__, "dtype": str(dtype).replace("torch.", ""),
        "mode": "fp32 weights, torch.autocast (none for float32), torch.inference_mode",
        "forward": forward, "tiled": tiled,
    }
    payload["targets"] = targets(payload)
    mode = "fp32" if dtype == torch.float32 else f"{payload['dtype']} autocast"
    title = f"HAT, visattn vs the official algorithm, {mode}, {payload['device']}, {payload['date']}"
    save_results(out_dir, "sr", payload, lambda path: plot(payload, path, title))
    print(title)
    print(summarize_forward(forward))
    if tiled:
        print(summarize_tiled(tiled))
    print("\n".join(payload["targets"]))
    return payload


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="visattn_hat_s_x4", help="HAT model of the forward comparison")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--size", type=int, default=256, help="LR side of the forward comparison's input")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                        help="autocast dtype (float32: no autocast)")
    parser.add_argument("--tiled-model", default="visattn_hat_x4", help="HAT model of the tiled upscale")
    parser.add_argument("--image-size", type=int, default=2048, help="side of the tiled upscale's uint8 image")
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--tile-overlap", type=int, default=32)
    parser.add_argument("--skip-tiled", action="store_true", help="forward comparison only")
    parser.add_argument("--skip-tiled-port", action="store_true", help="tiled upscale with visattn's HAT only")
    parser.add_argument("--out", default="benchmarks/results", help="folder for sr.json and sr.png")


def main(args: argparse.Namespace) -> int:
    run(args.model, args.batch, args.size, getattr(torch, args.dtype), None if args.skip_tiled else args.tiled_model,
        args.image_size, args.tile, args.tile_overlap, RUNNERS[:1] if args.skip_tiled_port else RUNNERS, args.out)
    return 0
