"""``visattn bench model``: whole-model training throughput, visattn backends against timm's Swin.

One training step is forward, backward and an AdamW step under bf16 autocast on random images and
labels. Every model runs in the same process on the same batch; the neighborhood-attention models
run once per op backend (``triton``, ``reference``; BiFormer also ``gather``, the official algorithm).
"""
from __future__ import annotations

import argparse
import datetime
import os
from typing import Dict, List, Optional

import timm
import torch
import torch.nn.functional as F

from visattn.bench.common import device_name, format_table, require_cuda, time_ms, write_json
from visattn.layers import BiLevelRoutingAttention, NeighborhoodAttention2d

# Layers whose op backend ``name@backend`` selects.
_BACKEND_LAYERS = (NeighborhoodAttention2d, BiLevelRoutingAttention)
DEFAULT_MODELS = ["visattn_dinat_t@triton", "visattn_dinat_t@reference", "swin_tiny_patch4_window7_224"]


def build(spec: str) -> torch.nn.Module:
    """``name`` or ``name@backend``: a timm model, its neighborhood / routed attention on ``backend``."""
    name, _, backend = spec.partition("@")
    model = timm.create_model(name, num_classes=1000)
    if backend:
        layers = [m for m in model.modules() if isinstance(m, _BACKEND_LAYERS)]
        if not layers:
            raise SystemExit(f"{name} has no neighborhood or routed attention, so '@{backend}' means nothing")
        for layer in layers:
            layer.backend = backend
    return model.cuda().train()


def train_throughput(spec: str, batch: int, image_size: int) -> Dict[str, float]:
    model = build(spec)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator(device="cuda").manual_seed(0)
    images = torch.randn(batch, 3, image_size, image_size, device="cuda", generator=gen)
    labels = torch.randint(0, 1000, (batch,), device="cuda", generator=gen)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(images), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):  # compile the kernels, allocate optimizer state
        step()
    torch.cuda.reset_peak_memory_stats()
    ms = time_ms(step)
    peak = torch.cuda.max_memory_allocated()
    return {"ms_per_step": ms, "images_per_s": batch / (ms * 1e-3), "peak_GiB": peak / 2**30}


def run(specs: List[str], batch: int, image_size: int, out_dir: Optional[str]) -> Dict[str, object]:
    require_cuda()
    results = {}
    for spec in specs:
        results[spec] = train_throughput(spec, batch, image_size)
        torch.cuda.empty_cache()  # the finished model's memory goes back before the next one
    first = results[specs[0]]["images_per_s"]
    rows = [
        {"model": spec, "ms/step": f"{r['ms_per_step']:.1f}", "img/s": f"{r['images_per_s']:.0f}",
         f"{specs[0]} speedup": f"{first / r['images_per_s']:.2f}x", "peak GiB": f"{r['peak_GiB']:.1f}"}
        for spec, r in results.items()
    ]
    payload = {
        "device": device_name(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__, "batch": batch, "image_size": image_size, "amp": "bfloat16",
        "results": results,
    }
    print(f"training step (fwd+bwd+AdamW), bf16 autocast, batch {batch}, {image_size}px, {payload['device']}, {payload['date']}")
    print(format_table(rows, list(rows[0])))
    if out_dir:
        write_json(os.path.join(out_dir, "model.json"), payload)
    return payload


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS, metavar="NAME[@BACKEND]",
                        help=f"timm names, optionally @triton / @reference / @gather (default: {' '.join(DEFAULT_MODELS)})")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--out", default="benchmarks/results", help="folder for model.json ('' for none)")


def main(args: argparse.Namespace) -> int:
    run(args.models, args.batch, args.image_size, args.out or None)
    return 0
