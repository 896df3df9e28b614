"""Where an SR model's forward time goes (GPU): torch.profiler over one autocast forward.

Prints the CUDA kernels by total time and their share, so the forward can be split into
attention, matmuls, convs, norms / element-wise ops and copies.
"""
import argparse
import time

import timm
import torch

import visattn  # noqa: F401  (registers the models)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="visattn_hat_s_x4")
    parser.add_argument("--size", type=int, default=256, help="LR side")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = timm.create_model(args.model).cuda().eval()
    x = torch.rand(1, 3, args.size, args.size, device="cuda")
    dtype = getattr(torch, args.dtype)

    def forward():
        with torch.inference_mode(), torch.autocast("cuda", dtype=dtype):
            model(x)

    for _ in range(3):
        forward()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        forward()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - start) / 10 * 1e3
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        forward()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.self_device_time_total for e in events)
    launches = sum(e.count for e in events)
    print(f"== {args.model}: {args.size}px LR, {args.dtype}: wall {wall:.1f} ms per forward, GPU kernel time "
          f"{total / 1e3:.1f} ms in {launches} kernels (wall above kernel time: launch-bound)")
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:args.rows]:
        print(f"  {e.self_device_time_total / 1e3:8.2f} ms  {100 * e.self_device_time_total / total:5.1f}%  "
              f"x{e.count:<5d} {e.key[:110]}")


if __name__ == "__main__":
    main()
