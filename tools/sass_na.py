"""Instruction and register counts of the Triton NA kernels for sm_90, compiled offline (no GPU needed).

Compiles ``_na_fwd_kernel`` / ``_na_bwd_dq_kernel`` / ``_na_bwd_dkdv_kernel`` for one of the
benchmark shapes (inputs sliced from a fused qkv, as the models pass them; run it without
``TRITON_INTERPRET``, whose kernels cannot be compiled) with the specialization
``JITFunction.run`` would make on the GPU (integer arguments equal to 1 become constants, multiples
of 16 get divisibility hints), disassembles them with the ``nvdisasm`` that ships with Triton and
prints, per kernel, the instruction count and the opcode histogram of each loop body. A proxy for
the per-element cost of a kernel change, to be confirmed by ``tools/tune_na.py`` on a GPU.

    python tools/sass_na.py --shape nat-t-s1 --fwd 1x4x8/r2/w2 --dq 1x8x8/r2/w2 --dkdv 1x4x8/r1/w2
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import tempfile
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from visattn.bench.na import SHAPES, NAShape
from visattn.kernels import triton_na
from visattn.kernels._checks import NAParams

_OPCODE = re.compile(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)")
_LABEL = re.compile(r"\s*\.(L_x_\d+):")
_BACK_BRANCH = re.compile(r"BRA\s+`?\(?\.?(L_x_\d+)")


def _call_key(kind: str, shape: NAShape, rpb: bool) -> tuple:
    """The launch key of ``shape`` with q, k, v sliced from a ``[B, H, W, 3, heads, D]`` qkv (and,
    for the backward, their gradients written into one such tensor, as the models' calls do)."""
    params = NAParams((shape.height, shape.width), (shape.kernel_size,) * 2, (shape.dilation,) * 2,
                      (shape.stride,) * 2, shape.heads, shape.head_dim, shape.head_dim ** -0.5)
    token = 3 * shape.heads * shape.head_dim
    q_strides = (shape.height * shape.width * token, shape.width * token, token, shape.head_dim, 1)
    k2 = 2 * shape.kernel_size - 1
    q_shape = (shape.batch, shape.height, shape.width, shape.heads, shape.head_dim)
    rpb_strides = (k2 * k2, 0, k2, 1)  # [heads, 2kh - 1, 2kw - 1] lifted to [heads, 1, 2kh - 1, 2kw - 1]
    return (kind, params, q_shape, q_strides, torch.bfloat16, rpb_strides if rpb else None, "cuda", kind == "bwd")


def compile_kernel(kind: str, shape: NAShape, cfg: triton_na.LaunchConfig, rpb: bool):
    """``kind`` ("fwd", "dq" or "dkdv") compiled for sm_90 as ``JITFunction.run`` would specialize it."""
    key = _call_key("fwd" if kind == "fwd" else "bwd", shape, rpb)
    call = triton_na._ForwardLaunch(key[:6] + ("cpu",) + key[7:] + (torch.bfloat16,), cfg).call if kind == "fwd" else triton_na._bwd_calls(key, cfg, cfg)[kind == "dkdv"]
    names = [p.name for p in call.kernel.params]
    pointers = sum(name.endswith("_ptr") for name in names)  # the kernels take their tensors first
    values = dict(zip(names[pointers:pointers + len(call.scalars)], call.scalars))
    fp32_pointers = {"lse_ptr", "delta_ptr", "drpb_ptr"}
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(call.kernel.params):
        if p.name in call.meta:
            signature[p.name], constexprs[(i,)] = "constexpr", call.meta[p.name]
        elif p.name.endswith("_ptr"):
            signature[p.name] = ("*fp32" if p.name in fp32_pointers else "*i32" if p.name == "class_ptr"
                                 else "*bf16")
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(values[p.name], float):
            signature[p.name] = "fp32"
        elif values[p.name] == 1:
            signature[p.name], constexprs[(i,)] = "constexpr", 1
        else:
            signature[p.name] = "i32"
            if values[p.name] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=call.kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    # The launch options the call passes (warps, a register cap) and the config's stages.
    options = {key: call.meta[key] for key in ("num_warps", "maxnreg") if key in call.meta}
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={**options, "num_stages": cfg.num_stages})


def disassemble(compiled) -> str:
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        return subprocess.run([os.path.join(tools, "nvdisasm"), "-c", cubin.name], capture_output=True,
                              text=True, check=True).stdout


def registers(compiled) -> int:
    """Registers per thread of the compiled kernel (from ``cuobjdump --dump-resource-usage``)."""
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([os.path.join(tools, "cuobjdump"), "--dump-resource-usage", cubin.name],
                               capture_output=True, text=True, check=True).stdout
    return int(re.search(r"REG:(\d+)", usage).group(1))


def summarize(sass: str) -> str:
    lines = sass.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) for m in [_LABEL.match(line)] if m}
    instructions = [(i, m.group(1)) for i, line in enumerate(lines) for m in [_OPCODE.search(line)] if m]
    out = [f"{len(instructions)} instructions"]
    for i, line in enumerate(lines):
        m = _BACK_BRANCH.search(line)
        if m and labels.get(m.group(1), i) < i:
            body = [op for j, op in instructions if labels[m.group(1)] <= j <= i]
            if len(body) > 20:
                top = collections.Counter(body).most_common(14)
                out.append(f"  loop of {len(body)}: " + " ".join(f"{op}:{n}" for op, n in top))
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="nat-t-s1", choices=[s.name for s in SHAPES])
    parser.add_argument("--fwd", default="1x4x8/r2/w2", help="tile/rows/warps[/sSTAGES][/mREGISTERS][/t: window tables], e.g. 1x4x8/r2/w2/s3/m80/t")
    parser.add_argument("--dq", default="1x8x8/r2/w2")
    parser.add_argument("--dkdv", default="1x4x8/r1/w2")
    parser.add_argument("--kernels", nargs="+", default=["fwd", "dq", "dkdv"], choices=["fwd", "dq", "dkdv"])
    args = parser.parse_args()
    shape = next(s for s in SHAPES if s.name == args.shape)
    for kind in args.kernels:
        for rpb in (True, False):
            compiled = compile_kernel(kind, shape, triton_na.LaunchConfig.parse(getattr(args, kind)), rpb)
            print(f"{kind} {'rpb' if rpb else 'no-rpb'} ({getattr(args, kind)}, {registers(compiled)} registers): "
                  f"{summarize(disassemble(compiled))}",
                  flush=True)


if __name__ == "__main__":
    main()
