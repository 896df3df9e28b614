"""Where one training step's time goes (GPU): torch.profiler over ``visattn bench model``'s step.

For each model spec (``name`` or ``name@backend``, as in ``visattn bench model``) prints the CUDA
kernels by total time and the share of the step each takes, and the step's wall time next to its
summed GPU kernel time (their difference is the time the GPU waits for the host's launches), so that
the step can be split into attention, matmuls, norms / element-wise ops and launch gaps. Also the
time the host takes to issue a step (``step()`` returning, before the GPU has finished) beside its
wall time: equal when the step is bound by the host, shorter when the GPU is the limit.

``--host`` adds the host ops by self CPU time (torch.profiler); ``--python N`` a cProfile of three
steps, the N Python / C functions by own time, with autograd running the backward on the calling
thread (as ``torch.autograd.set_multithreading_enabled(False)``) so that the Python backward
functions of visattn's ops are in it too; that also prints the step's wall time with and without
autograd's device threads.
"""
import argparse
import cProfile
import io
import pstats
import time

import torch

from visattn.bench.common import cuda_kernel_table, wall_ms
from visattn.bench.model import training_step


def issue_and_wall_ms(step, repeats: int = 5) -> tuple:
    """Median ms for the host to issue ``step`` and for the step to finish on the GPU."""
    issue, wall = [], []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        issue.append(time.perf_counter() - start)
        torch.cuda.synchronize()
        wall.append(time.perf_counter() - start)
    return sorted(issue)[repeats // 2] * 1e3, sorted(wall)[repeats // 2] * 1e3


def python_profile(step, rows: int) -> None:
    for threads in (True, False):
        torch.autograd.set_multithreading_enabled(threads)
        print(f"-- wall {wall_ms(step, 5):.1f} ms per step with autograd device threads {'on' if threads else 'off'}")
    profiler = cProfile.Profile()
    try:
        profiler.enable()
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        profiler.disable()
    finally:
        torch.autograd.set_multithreading_enabled(True)
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(rows)
    print("-- cProfile of 3 steps (autograd on the calling thread), by own time:")
    print(text.getvalue())


def profile(spec: str, batch: int, image_size: int, rows: int, optimizer: str, host: bool, python_rows: int) -> None:
    step = training_step(spec, batch, image_size, optimizer)
    for _ in range(3):
        step()
    wall = wall_ms(step, 5)
    issue, issue_wall = issue_and_wall_ms(step)
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(2):
            step()
        torch.cuda.synchronize()
    gpu_ms, _, lines = cuda_kernel_table(prof, 2, rows)
    print(f"== {spec}: batch {batch}, {image_size}px, wall {wall:.1f} ms per step (unprofiled), GPU kernel time {gpu_ms:.1f} ms")
    print(f"-- host issues a step in {issue:.1f} ms of its {issue_wall:.1f} ms wall time")
    print("\n".join(lines))
    if host:
        cpu = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CPU]
        cpu_total = sum(e.self_cpu_time_total for e in cpu)
        print(f"-- host: self CPU time {cpu_total / 2e3:.1f} ms per step in {sum(e.count for e in cpu) // 2} ops (profiled)")
        for e in sorted(cpu, key=lambda e: -e.self_cpu_time_total)[:rows]:
            print(f"  {e.self_cpu_time_total / 2e3:8.2f} ms  x{e.count // 2:<5d} {e.self_cpu_time_total / max(1, e.count):6.1f} us  {e.key[:90]}")
    if python_rows:
        python_profile(step, python_rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["visattn_dinat_t@triton", "swin_tiny_patch4_window7_224"])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--optimizer", default="fused", choices=["fused", "foreach"])
    parser.add_argument("--host", action="store_true", help="also the host ops by self CPU time")
    parser.add_argument("--python", type=int, default=0, metavar="N",
                        help="also a cProfile of the step (autograd on the calling thread): its N top functions")
    args = parser.parse_args()
    for spec in args.models:
        profile(spec, args.batch, args.image_size, args.rows, args.optimizer, args.host, args.python)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
