"""``visattn bench model``: whole-model training throughput, visattn backends against timm's Swin.

One training step is forward, backward and an AdamW step (``fused=True`` by default, the fastest
torch has; ``--optimizer foreach`` for the multi-tensor one) under bf16 autocast on random images
and labels. Every model runs in the same process on the same batch; the neighborhood-attention
models run once per op backend (``triton``, ``reference``; BiFormer also ``gather``, the official
algorithm). The time per step is the median over ``--rounds`` rounds of ``--steps`` steps per model
(the models in turn within each round), each timed by CUDA events,
measured as ``eager`` (a plain training loop: a model whose kernels are short waits for the host
to launch them) and ``graph`` (the whole step captured in one CUDA graph and replayed: the GPU time
of the kernels alone, what a host-bound model gains from graph capture); ``--timings compiled``
adds the loop on ``torch.compile(model)`` and ``compiled-graph`` that step captured in a graph.
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence

import timm
import torch
import torch.nn.functional as F

from visattn.bench.common import capture_graph, device_name, format_table, require_cuda, warm_up, write_json
from visattn.layers import BiLevelRoutingAttention, NeighborhoodAttention2d, NHWCTransformerBlock

# Layers whose op backend ``name@backend`` selects.
_BACKEND_LAYERS = (NeighborhoodAttention2d, BiLevelRoutingAttention)
DEFAULT_MODELS = ["visattn_dinat_t@triton", "visattn_dinat_t@triton:nographs", "visattn_dinat_t@triton:modular",
                  "visattn_dinat_t@reference", "swin_tiny_patch4_window7_224"]


def _transformer_blocks(model: torch.nn.Module) -> List[NHWCTransformerBlock]:
    return [m for m in model.modules() if isinstance(m, NHWCTransformerBlock)]


def build(spec: str) -> torch.nn.Module:
    """``name[@backend][:variant]``: a timm model, its neighborhood / routed attention on
    ``backend``; ``:modular`` turns visattn's fused blocks off (each op its own autograd node),
    ``:nographs`` their CUDA graphs (each fused block issues its kernels from Python)."""
    base, _, variant = spec.partition(":")
    if variant not in ("", "modular", "nographs"):
        raise SystemExit(f"unknown model variant ':{variant}' in {spec!r}; expected ':modular', ':nographs' or none")
    name, _, backend = base.partition("@")
    model = timm.create_model(name, num_classes=1000)
    if backend:
        layers = [m for m in model.modules() if isinstance(m, _BACKEND_LAYERS)]
        if not layers:
            raise SystemExit(f"{name} has no neighborhood or routed attention, so '@{backend}' means nothing")
        for layer in layers:
            layer.backend = backend
    if variant:
        blocks = _transformer_blocks(model)
        if not blocks:
            raise SystemExit(f"{name} has no visattn transformer blocks, so ':{variant}' means nothing")
        for block in blocks:
            setattr(block, "fused" if variant == "modular" else "cuda_graphs", False)
    return model.cuda().train()


OPTIMIZERS = ("fused", "foreach")
TIMINGS = ("eager", "graph", "compiled", "compiled-graph")
DEFAULT_TIMINGS = ("eager", "graph")


def _step_ms(step: Callable[[], object], steps: int) -> List[float]:
    """Milliseconds of each of ``steps`` calls of ``step``, back to back, by CUDA events."""
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
    for start, end in events:
        start.record()
        step()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) for start, end in events]


def training_step(spec: str, batch: int, image_size: int, optimizer: str = "fused", for_graph: bool = False,
                  compiled: bool = False) -> Callable[[], None]:
    """One training step of ``spec`` (see :func:`build`) on a fixed random batch: bf16-autocast
    forward, cross-entropy, backward, AdamW (``optimizer``: ``fused`` or ``foreach``), zeroed
    gradients. ``for_graph`` makes the step capturable (``capturable`` AdamW, no autocast weight
    cache, gradients zeroed in place, no per-block graphs); ``compiled`` runs ``torch.compile(model)``."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    model = build(spec)
    if for_graph:  # the whole step is one graph: the blocks' own graphs would only hold memory
        for block in _transformer_blocks(model):
            block.cuda_graphs = False
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, capturable=for_graph, **{optimizer: True})
    if compiled:
        model = torch.compile(model)
    gen = torch.Generator(device="cuda").manual_seed(0)
    images = torch.randn(batch, 3, image_size, image_size, device="cuda", generator=gen)
    labels = torch.randint(0, 1000, (batch,), device="cuda", generator=gen)

    def step() -> None:
        # The autocast weight cache cannot outlive a graph capture.
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=not for_graph):
            loss = F.cross_entropy(model(images), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=not for_graph)

    return step


# Untimed steps before the first timed one: kernels compile and tune in the first; the others let
# the allocator's pools and the launch caches settle.
WARM_UP_STEPS = 5


class PreparedStep(NamedTuple):
    run: Callable[[], object]  # one timed step
    peak_GiB: float
    step: Callable[[], None]  # the eager step; a graph replays kernels on its model and tensors


def prepared_step(spec: str, batch: int, image_size: int, optimizer: str = "fused",
                  timing: str = "eager") -> PreparedStep:
    """The step of ``spec`` as ``timing`` runs it (warmed up), the GiB it allocated at its peak
    (model, optimizer state, the step's activations; a graph's memory is allocated while it is
    captured) and the eager step it came from.

    ``timing="eager"`` runs the step as a training loop does; ``"graph"`` captures the whole step
    (forward, loss, backward, AdamW with ``capturable=True``) in one CUDA graph and replays it,
    which removes the host's launch overhead (PyTorch's whole-network capture); ``"compiled"`` runs
    the eager loop on ``torch.compile(model)`` (inductor fuses the element-wise ops around visattn's
    custom ops, so fewer launches); ``"compiled-graph"`` captures the step of the compiled model in
    one CUDA graph: the GPU time of the compiled kernels, which a host-bound compiled model does not
    reach in its eager loop."""
    if timing not in TIMINGS:
        raise ValueError(f"timing must be one of {TIMINGS}, got {timing!r}")
    graph = timing in ("graph", "compiled-graph")
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step = training_step(spec, batch, image_size, optimizer, for_graph=graph,
                         compiled=timing in ("compiled", "compiled-graph"))
    warm_up(step, WARM_UP_STEPS)  # compile the kernels, allocate optimizer state and gradients
    run_step = capture_graph(step).replay if graph else step
    run_step()
    torch.cuda.synchronize()
    return PreparedStep(run_step, (torch.cuda.max_memory_allocated() - before) / 2**30, step)


def _out_of_memory(spec: str, exc: torch.OutOfMemoryError) -> str:
    return (f"out of memory beside the other models ({str(exc).splitlines()[0][:100]}); "
            f"time it alone with --models {spec}")


def run(specs: List[str], batch: int, image_size: int, out_dir: Optional[str], optimizer: str = "fused",
        steps: int = 10, timings: Sequence[str] = DEFAULT_TIMINGS, rounds: int = 3) -> Dict[str, object]:
    """Per timing, every model's step prepared side by side, then ``rounds`` rounds in which each
    model runs ``steps`` timed steps in turn: the host's speed drifts over a run, and interleaving
    spreads the drift over all models instead of charging it to whichever ran first. Each result is
    the median over all its timed steps, with the medians of its rounds beside it. A model whose
    step runs out of memory beside the others gets ``{"error": ...}`` instead, and the rest run."""
    require_cuda()
    if rounds < 1 or steps < 1:
        raise ValueError(f"rounds and steps must be at least 1, got {rounds} and {steps}")
    results: Dict[str, Dict[str, Dict[str, object]]] = {spec: {} for spec in specs}
    for timing in timings:
        prepared = {}
        for spec in specs:
            try:
                prepared[spec] = prepared_step(spec, batch, image_size, optimizer, timing)
            except torch.OutOfMemoryError as exc:
                # The models live side by side (interleaved rounds): one that does not fit beside the
                # others is reported, and the rest still run.
                results[spec][timing] = {"error": _out_of_memory(spec, exc)}
            if spec not in prepared:  # out of the handler: its traceback no longer holds the failed model
                torch.cuda.empty_cache()
        samples: Dict[str, List[List[float]]] = {spec: [] for spec in prepared}
        for _ in range(rounds):
            for spec, prep in prepared.items():
                samples[spec].append(_step_ms(prep.run, steps))
        for spec, prep in prepared.items():
            ms = statistics.median(t for round_ms in samples[spec] for t in round_ms)
            results[spec][timing] = {
                "ms_per_step": ms, "images_per_s": batch / (ms * 1e-3), "peak_GiB": prep.peak_GiB,
                "round_medians_ms": [statistics.median(round_ms) for round_ms in samples[spec]]}
        del prepared
        torch.cuda.empty_cache()  # this timing's models' memory goes back before the next timing's
    rows, errors = [], []
    for spec, by_timing in results.items():
        row = {"model": spec}
        for timing, r in by_timing.items():
            if "error" in r:
                row[f"{timing} ms/step"] = "out of memory"
                errors.append(f"{spec} ({timing}): {r['error']}")
                continue
            first = results[specs[0]][timing].get("images_per_s", float("nan"))
            spread = "-".join(f"{m:.1f}" for m in (min(r["round_medians_ms"]), max(r["round_medians_ms"])))
            row.update({f"{timing} ms/step": f"{r['ms_per_step']:.1f}", f"{timing} rounds": spread,
                        f"{timing} img/s": f"{r['images_per_s']:.0f}",
                        f"{timing} vs {specs[0]}": f"{r['images_per_s'] / first:.2f}x",
                        f"{timing} peak GiB": f"{r['peak_GiB']:.1f}"})
        rows.append(row)
    payload = {
        "device": device_name(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__, "batch": batch, "image_size": image_size, "amp": "bfloat16",
        "optimizer": f"AdamW({optimizer}=True)", "steps": steps, "rounds": rounds,
        "warm_up_steps": WARM_UP_STEPS, "results": results,
    }
    print(f"training step (fwd+bwd+AdamW {optimizer}), bf16 autocast, batch {batch}, {image_size}px, {payload['device']}, {payload['date']}")
    columns = list(dict.fromkeys(column for row in rows for column in row))
    print(format_table(rows, columns))
    if errors:
        print("not run: " + "; ".join(errors))
    if out_dir:
        write_json(os.path.join(out_dir, "model.json"), payload)
    return payload


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS, metavar="NAME[@BACKEND][:VARIANT]",
                        help=f"timm names, optionally @triton / @reference / @gather, and :modular for visattn blocks without fusion, :nographs without their CUDA graphs (default: {' '.join(DEFAULT_MODELS)})")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--optimizer", default="fused", choices=OPTIMIZERS, help="AdamW implementation (default: fused)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per model and round (default: 10)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every model's steps in turn (default: 3)")
    parser.add_argument("--timings", nargs="+", default=list(DEFAULT_TIMINGS), choices=TIMINGS,
                        help="eager steps, replays of the step captured in a CUDA graph, eager steps of "
                             "torch.compile(model), and/or replays of that step captured in a graph "
                             "(default: eager graph)")
    parser.add_argument("--out", default="benchmarks/results", help="folder for model.json ('' for none)")


def main(args: argparse.Namespace) -> int:
    run(args.models, args.batch, args.image_size, args.out or None, args.optimizer, args.steps, args.timings,
        args.rounds)
    return 0
