"""Time every launch-config candidate of the Triton NA kernels on the benchmark shapes (GPU).

Prints, per shape and kernel, each candidate's median ms, the best first; used to choose the
candidate lists and defaults in kernels/triton_na.py. ``--tiles / --rows / --warps / --stages /
--max-registers`` replace the 2-D candidate lists of every kernel for the run by their product (to
time configurations that are not candidates); ``--configs`` replaces the 2-D forward candidates by
the configs named (``LaunchConfig`` strings, e.g. ``1x4x8/r2/w2/s3/t``).
"""
import argparse
import time

import torch

from visattn.bench.na import SHAPES
from visattn.kernels import na2d
from visattn.kernels import triton_na


def _tile(text: str) -> tuple:
    tile = tuple(int(n) for n in text.split("x"))
    if len(tile) != 3:
        raise argparse.ArgumentTypeError(f"a tile is TxHxW (e.g. 1x8x8), got {text!r}")
    return tile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shapes", nargs="+", default=[s.name for s in SHAPES])
    parser.add_argument("--no-rpb", action="store_true")
    parser.add_argument("--forward-only", action="store_true", help="tune the forward kernel only")
    parser.add_argument("--rpb-dtype", default="bfloat16", choices=["bfloat16", "float32"],
                        help="dtype of the rpb (the models' is float32, under autocast)")
    parser.add_argument("--tiles", nargs="+", type=_tile, help="2-D tile candidates, e.g. 1x8x8 1x4x8")
    parser.add_argument("--rows", nargs="+", type=int, help="key rows per step of the query-centric kernels")
    parser.add_argument("--warps", nargs="+", type=int)
    parser.add_argument("--stages", nargs="+", type=int)
    parser.add_argument("--max-registers", nargs="+", type=int, help="register caps per thread (0: none)")
    parser.add_argument("--configs", nargs="+", type=triton_na.LaunchConfig.parse,
                        help="2-D forward candidates, e.g. 1x4x8/r2/w2/s3/t 1x2x8/r2/w1/t")
    args = parser.parse_args()
    if args.tiles or args.rows or args.warps or args.stages or args.max_registers:
        for kind, by_rank in triton_na._CANDIDATES.items():
            current = by_rank[2]
            tiles = args.tiles or sorted({c.tile for c in current})
            rows = (1,) if kind == "bwd_dkdv" else (args.rows or sorted({c.rows for c in current}))
            warps = args.warps or sorted({c.num_warps for c in current})
            stages = args.stages or sorted({c.num_stages for c in current})
            caps = args.max_registers or sorted({c.max_registers or 0 for c in current})
            by_rank[2] = [triton_na.LaunchConfig(t, r, w, s, m or None)
                          for t in tiles for r in rows for w in warps for s in stages for m in caps]
    if args.configs:
        triton_na._CANDIDATES["fwd"][2] = args.configs
    for shape in (s for s in SHAPES if s.name in args.shapes):
        t0 = time.time()
        q, k, v = (torch.randn(shape.batch, shape.height, shape.width, shape.heads, shape.head_dim, device="cuda",
                               dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        rpb = None if args.no_rpb else torch.zeros(shape.heads, 2 * shape.kernel_size - 1, 2 * shape.kernel_size - 1,
                                                   device="cuda", dtype=getattr(torch, args.rpb_dtype),
                                                   requires_grad=True)
        triton_na.TUNER.timings.clear()
        triton_na.TUNER.best.clear()
        triton_na._CALLS.entries.clear()  # cached launches would skip the tuning
        out = na2d(q, k, v, shape.kernel_size, shape.dilation, shape.stride, rpb=rpb, backend="triton")
        if not args.forward_only:
            out.backward(torch.randn_like(out))
        torch.cuda.synchronize()
        print(f"== {shape.name} (rpb={rpb is not None and args.rpb_dtype}) tuned in {time.time() - t0:.0f}s", flush=True)
        for key, timings in triton_na.TUNER.timings.items():
            ranked = sorted(timings.items(), key=lambda kv: kv[1])
            print(f"  {key[0]:9s} " + "  ".join(f"{c}={ms:.4f}" for c, ms in ranked), flush=True)


if __name__ == "__main__":
    main()
