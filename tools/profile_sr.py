"""Where an SR model's forward time goes (GPU): torch.profiler over one autocast forward.

Prints the CUDA kernels by total time and their share, so the forward can be split into
attention, matmuls, convs, norms / element-wise ops and copies.
"""
import argparse

import timm
import torch

import visattn  # noqa: F401  (registers the models)
from visattn.bench.common import cuda_kernel_table, wall_ms


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
    wall = wall_ms(forward, 10)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        forward()
        torch.cuda.synchronize()
    gpu_ms, launches, lines = cuda_kernel_table(prof, 1, args.rows)
    print(f"== {args.model}: {args.size}px LR, {args.dtype}: wall {wall:.1f} ms per forward, GPU kernel time "
          f"{gpu_ms:.1f} ms in {launches} kernels (wall above kernel time: launch-bound)")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
