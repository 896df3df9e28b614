"""Time every launch-config candidate of the Triton NA kernels on the benchmark shapes (GPU).

Prints, per shape and kernel, each candidate's median ms, the best first; used to choose the
candidate lists and defaults in kernels/triton_na.py.
"""
import argparse
import time

import torch

from visattn.bench.na import SHAPES
from visattn.kernels import na2d
from visattn.kernels import triton_na


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shapes", nargs="+", default=[s.name for s in SHAPES])
    parser.add_argument("--no-rpb", action="store_true")
    args = parser.parse_args()
    for shape in (s for s in SHAPES if s.name in args.shapes):
        t0 = time.time()
        q, k, v = (torch.randn(shape.batch, shape.height, shape.width, shape.heads, shape.head_dim, device="cuda",
                               dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        rpb = None if args.no_rpb else torch.zeros(shape.heads, 2 * shape.kernel_size - 1, 2 * shape.kernel_size - 1,
                                                   device="cuda", dtype=torch.bfloat16, requires_grad=True)
        triton_na.TIMINGS.clear()
        triton_na._TUNED.clear()
        triton_na._CALLS.entries.clear()  # cached launches would skip the tuning
        out = na2d(q, k, v, shape.kernel_size, shape.dilation, shape.stride, rpb=rpb, backend="triton")
        out.backward(torch.randn_like(out))
        torch.cuda.synchronize()
        print(f"== {shape.name} (rpb={rpb is not None}) tuned in {time.time() - t0:.0f}s", flush=True)
        for key, timings in triton_na.TIMINGS.items():
            ranked = sorted(timings.items(), key=lambda kv: kv[1])
            print(f"  {key[0]:9s} " + "  ".join(f"{c.tile[1]}x{c.tile[2]}/w{c.num_warps}/s{c.num_stages}={ms:.3f}"
                                              for c, ms in ranked), flush=True)


if __name__ == "__main__":
    main()
