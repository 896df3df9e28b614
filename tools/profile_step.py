"""Where one training step's GPU time goes (GPU): torch.profiler over ``visattn bench model``'s step.

For each model spec (``name`` or ``name@backend``, as in ``visattn bench model``) prints the CUDA
kernels by total time and the share of the step each takes, and the host (CPU) time of the step,
so that the step's time can be split into attention, matmuls, norms / element-wise ops and launch gaps.
"""
import argparse

import torch
import torch.nn.functional as F

from visattn.bench.model import build


def profile(spec: str, batch: int, image_size: int, rows: int) -> None:
    model = build(spec)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.randn(batch, 3, image_size, image_size, device="cuda")
    labels = torch.randint(0, 1000, (batch,), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(images), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(2):
            step()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.self_device_time_total for e in events)
    print(f"== {spec}: batch {batch}, {image_size}px, GPU kernel time per step {total / 2e3:.1f} ms")
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:rows]:
        print(f"  {e.self_device_time_total / 2e3:8.2f} ms  {100 * e.self_device_time_total / total:5.1f}%  "
              f"x{e.count // 2:<5d} {e.key[:110]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=["visattn_dinat_t@triton", "swin_tiny_patch4_window7_224"])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args()
    for spec in args.models:
        profile(spec, args.batch, args.image_size, args.rows)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
