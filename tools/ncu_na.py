"""Run one Triton NA forward configuration a few times, for Nsight Compute to profile (GPU).

The tuner is bypassed: the forward uses ``--config`` (a ``LaunchConfig`` string), the backward
kernels their defaults. q, k, v are slices of one packed qkv, as the models pass them. On the GPU
machine (``--clock-control none`` leaves its clocks alone; skip the first launches, which compile):

    ncu --clock-control none --kernel-name regex:_na_fwd_kernel --launch-skip 2 --launch-count 1 \\
        --section SpeedOfLight --section Occupancy --section WarpStateStats --section SchedulerStats \\
        --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\\.ratio" \\
        python tools/ncu_na.py --shape nat-t-s1 --config 1x4x8/r2/w1/s3/t
"""
import argparse

import torch

from visattn.bench.na import SHAPES, _make_inputs
from visattn.kernels import na2d_qkv, triton_na


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="nat-t-s1", choices=[s.name for s in SHAPES])
    parser.add_argument("--config", default="1x4x8/r2/w1/s3/t", type=triton_na.LaunchConfig.parse)
    parser.add_argument("--no-rpb", action="store_true")
    parser.add_argument("--calls", type=int, default=3)
    args = parser.parse_args()
    shape = next(s for s in SHAPES if s.name == args.shape)
    triton_na._candidates = lambda kind, rank: [args.config] if kind == "fwd" else triton_na._CANDIDATES[kind][rank][:1]
    qkv, rpb = _make_inputs(shape, torch.bfloat16)  # the benchmark's inputs
    rpb = None if args.no_rpb else rpb
    with torch.no_grad():
        for _ in range(args.calls):
            na2d_qkv(qkv, shape.kernel_size, shape.dilation, shape.stride, rpb=rpb, backend="triton")
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
