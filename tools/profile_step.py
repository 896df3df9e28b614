"""Where one training step's GPU time goes (GPU): torch.profiler over ``visattn bench model``'s step.

For each model spec (``name`` or ``name@backend``, as in ``visattn bench model``) prints the CUDA
kernels by total time and the share of the step each takes, and the step's wall time next to its
summed GPU kernel time (their difference is the time the GPU waits for the host's launches), so that
the step can be split into attention, matmuls, norms / element-wise ops and launch gaps.
"""
import argparse

import torch

from visattn.bench.common import cuda_kernel_table, wall_ms
from visattn.bench.model import training_step


def profile(spec: str, batch: int, image_size: int, rows: int, optimizer: str, host: bool) -> None:
    step = training_step(spec, batch, image_size, optimizer)
    for _ in range(3):
        step()
    wall = wall_ms(step, 5)
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(2):
            step()
        torch.cuda.synchronize()
    gpu_ms, _, lines = cuda_kernel_table(prof, 2, rows)
    print(f"== {spec}: batch {batch}, {image_size}px, wall {wall:.1f} ms per step (unprofiled), GPU kernel time {gpu_ms:.1f} ms")
    print("\n".join(lines))
    if host:
        cpu = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CPU]
        cpu_total = sum(e.self_cpu_time_total for e in cpu)
        print(f"-- host: self CPU time {cpu_total / 2e3:.1f} ms per step in {sum(e.count for e in cpu) // 2} ops (profiled)")
        for e in sorted(cpu, key=lambda e: -e.self_cpu_time_total)[:rows]:
            print(f"  {e.self_cpu_time_total / 2e3:8.2f} ms  x{e.count // 2:<5d} {e.self_cpu_time_total / max(1, e.count):6.1f} us  {e.key[:90]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=["visattn_dinat_t@triton", "swin_tiny_patch4_window7_224"])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--optimizer", default="fused", choices=["fused", "foreach"])
    parser.add_argument("--host", action="store_true", help="also the host ops by self CPU time")
    args = parser.parse_args()
    for spec in args.models:
        profile(spec, args.batch, args.image_size, args.rows, args.optimizer, args.host)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
