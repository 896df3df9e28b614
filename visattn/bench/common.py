"""Timing, memory and reporting helpers shared by the benchmarks."""
from __future__ import annotations

import json
import os
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch


def require_cuda() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("visattn bench: the benchmarks time CUDA kernels and need a CUDA device")


def device_name() -> str:
    return torch.cuda.get_device_name()


def time_ms(fn: Callable[[], object], grad_to_none: Optional[Sequence[torch.Tensor]] = None) -> float:
    """Median time of ``fn`` in milliseconds (CUDA events, L2 flushed between runs)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median"))


def warm_up(fn: Callable[[], object], times: int = 3) -> None:
    """Run ``fn`` ``times`` times on a side stream (compiling / autotuning kernels, allocating
    state), as a CUDA graph capture of it must be preceded by."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(times):
            fn()
    torch.cuda.current_stream().wait_stream(side)


def capture_graph(fn: Callable[[], object]) -> torch.cuda.CUDAGraph:
    """``fn`` captured in a CUDA graph (warm it up first; ``fn`` must not synchronize)."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def graph_time_ms(fn: Callable[[], object]) -> float:
    """Median time of replaying ``fn`` captured in a CUDA graph: the GPU time of its kernels without
    the host's launch overhead (``fn`` must not synchronize; gradients it makes accumulate)."""
    warm_up(fn)
    graph = capture_graph(fn)
    ms = time_ms(graph.replay)
    del graph
    return ms


def wall_ms(fn: Callable[[], object], repeats: int) -> float:
    """Mean wall-clock ms of ``fn`` over ``repeats`` calls, host and device together."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats * 1e3


def cuda_kernel_table(prof: "torch.profiler.profile", calls: int, rows: int) -> Tuple[float, int, List[str]]:
    """The CUDA kernels of a profile of ``calls`` identical calls: GPU ms per call, kernel launches
    per call, and the ``rows`` longest kernels as lines (ms per call, share, launches per call, name)."""
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.self_device_time_total for e in events)
    lines = [f"  {e.self_device_time_total / calls / 1e3:8.2f} ms  {100 * e.self_device_time_total / max(1, total):5.1f}%  "
             f"x{e.count // calls:<5d} {e.key[:110]}"
             for e in sorted(events, key=lambda e: -e.self_device_time_total)[:rows]]
    return total / calls / 1e3, sum(e.count for e in events) // calls, lines


def peak_extra_bytes(fn: Callable[[], object]) -> int:
    """Peak CUDA memory ``fn`` allocates on top of what is allocated when it starts."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def copy_bandwidth(n_bytes: int = 1 << 30) -> float:
    """Measured device-to-device copy bandwidth in bytes/s (bytes read plus bytes written)."""
    src = torch.empty(n_bytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src))
    return 2 * n_bytes / (ms * 1e-3)


def select_shapes(shapes: Sequence, names: Optional[Sequence[str]]) -> list:
    """The shapes named in ``names`` (all when ``None``); exits naming the valid names on a typo."""
    if not names:
        return list(shapes)
    unknown = set(names) - {s.name for s in shapes}
    if unknown:
        raise SystemExit(f"unknown shapes {sorted(unknown)}; expected names from {[s.name for s in shapes]}")
    return [s for s in shapes if s.name in names]


def format_table(rows: List[Dict[str, object]], columns: Sequence[str]) -> str:
    cells = [[("" if row.get(c) is None else str(row.get(c))) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    line = lambda values: "  ".join(v.ljust(w) for v, w in zip(values, widths))
    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(r) for r in cells])


def write_json(path: str, payload: Dict[str, object]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)

def save_results(out_dir: str, stem: str, payload: Dict, draw: Callable[[str], None]) -> None:
    """Write ``payload`` to ``out_dir/stem.json`` and ``draw(path)`` the chart to ``out_dir/stem.png``
    (skipped with a note when matplotlib is missing: the numbers matter more than the picture)."""
    os.makedirs(out_dir, exist_ok=True)
    write_json(os.path.join(out_dir, f"{stem}.json"), payload)
    try:
        draw(os.path.join(out_dir, f"{stem}.png"))
    except ImportError:
        print("matplotlib is not installed: no PNG (pip install matplotlib)")

