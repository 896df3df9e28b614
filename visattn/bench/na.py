"""``visattn bench na``: neighborhood attention, visattn's Triton kernels against the alternatives.

In one process, on the same bf16 inputs: (a) visattn Triton, with and without rpb, (b)
``torch.compile(flex_attention)`` with a neighborhood block mask (rpb through ``score_mod``), (c)
natten's ``na2d`` when natten is installed (no rpb), (d) visattn's reference backend and (e) dense
``scaled_dot_product_attention`` over all tokens. Forward and forward+backward medians, each timed
two ways: eager (one call after another, the host's launch overhead included) and replayed from a
CUDA graph (the kernels' GPU time alone; a competitor that cannot be captured is reported as such);
the HBM roofline of the forward (bytes of q, k, v, out at the measured copy bandwidth) and the peak
memory of forward+backward. Prints a table, writes JSON and a PNG bar chart.

A single graph replay's time also holds the replay's fixed cost (a few µs, a tenth of the NAT-T
stage-1 forward), which the copy that measures the bandwidth, one long kernel, does not pay. So
visattn's forward is also timed per call of several calls replayed back to back from one graph,
each on its own copy of the inputs, the copies together at least twice the L2 (every call reads
its inputs from HBM, as a lone call after an L2 flush does): ``per_call_graph_ms`` in the JSON,
and the roofline ratio of both.
"""
from __future__ import annotations

import argparse
import datetime
import math
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from visattn.bench.common import (
    copy_bandwidth, device_name, format_table, graph_time_ms, peak_extra_bytes, require_cuda, save_results, select_shapes,
    time_ms,
)
from visattn.kernels import na2d, na2d_qkv, triton_na


@dataclass(frozen=True)
class NAShape:
    name: str
    batch: int
    heads: int
    height: int
    width: int
    head_dim: int
    kernel_size: int
    dilation: int = 1
    stride: int = 1


SHAPES = [
    NAShape("nat-t-s1", 32, 2, 56, 56, 32, 7),
    NAShape("dinat-t-s1-d8", 32, 2, 56, 56, 32, 7, dilation=8),
    NAShape("nat-t-s3", 32, 8, 14, 14, 32, 7),
    NAShape("dinat-l384-s1", 8, 6, 96, 96, 32, 7),
    NAShape("k13-128-d64", 4, 4, 128, 128, 64, 13),
    NAShape("hat-window16", 4, 6, 64, 64, 32, 16, stride=16),
]

COMPETITORS = ["triton", "triton no-rpb", "flex", "flex no-rpb", "natten no-rpb", "reference", "sdpa dense"]

# A competitor builds, from the shared inputs, a callable running the op once and returning its output.
Runner = Callable[[], torch.Tensor]


def _axis_window(pos, length: int, kernel: int, dilation: int, stride: int):
    """Dilation group, sub-grid position and window start of positions ``pos`` (tensor) on one axis."""
    group = pos % dilation
    sub = pos // dilation
    sub_len = (length - group + dilation - 1) // dilation
    leader = torch.minimum((sub // stride) * stride + stride // 2, sub_len - 1)
    start = torch.minimum(torch.clamp(leader - kernel // 2, min=0), sub_len - kernel)
    return group, sub, start


def flex_mods(shape: NAShape, rpb: Optional[torch.Tensor]):
    """``(mask_mod, score_mod)`` of flex_attention for the neighborhood of ``shape`` (row-major tokens)."""
    H, W, k, d, s = shape.height, shape.width, shape.kernel_size, shape.dilation, shape.stride

    def coords(idx):
        gy, sy, y0 = _axis_window(idx // W, H, k, d, s)
        gx, sx, x0 = _axis_window(idx % W, W, k, d, s)
        return gy, sy, y0, gx, sx, x0

    def mask_mod(b, h, q_idx, kv_idx):
        qgy, qsy, y0, qgx, qsx, x0 = coords(q_idx)
        kgy, ksy, _, kgx, ksx, _ = coords(kv_idx)
        return (qgy == kgy) & (qgx == kgx) & (ksy >= y0) & (ksy < y0 + k) & (ksx >= x0) & (ksx < x0 + k)

    def rpb_score_mod(score, b, h, q_idx, kv_idx):
        _, qsy, _, _, qsx, _ = coords(q_idx)
        _, ksy, _, _, ksx, _ = coords(kv_idx)
        # flex also evaluates masked-out pairs: clamp their (unused) offsets into range.
        return score + rpb[h, torch.clamp(ksy - qsy + k - 1, 0, 2 * k - 2), torch.clamp(ksx - qsx + k - 1, 0, 2 * k - 2)]

    return mask_mod, (rpb_score_mod if rpb is not None else None)


def _make_inputs(shape: NAShape, dtype: torch.dtype):
    B, heads, H, W, D = shape.batch, shape.heads, shape.height, shape.width, shape.head_dim
    gen = torch.Generator(device="cuda").manual_seed(0)
    # As a model makes them: q, k, v are views of one fused qkv projection.
    qkv = torch.randn(B, H, W, 3, heads, D, device="cuda", dtype=dtype, generator=gen)
    rpb = 0.02 * torch.randn(heads, 2 * shape.kernel_size - 1, 2 * shape.kernel_size - 1, device="cuda", generator=gen)
    return qkv, rpb.to(dtype)


def _runners(shape: NAShape, qkv: torch.Tensor, rpb: torch.Tensor, backward: bool) -> Dict[str, Tuple[Runner, list]]:
    """Competitor name -> (runner, tensors whose .grad to reset); absent competitors are skipped."""
    B, H, W, _, heads, D = qkv.shape
    k, d, s = shape.kernel_size, shape.dilation, shape.stride
    leaf_qkv = qkv.detach().requires_grad_(backward)
    leaf_rpb = rpb.detach().requires_grad_(backward)
    # visattn takes the packed qkv as the models pass it (na2d_qkv); q, k, v for the others are
    # sliced inside each call, as a model slices its projection: views made once outside would
    # keep qkv's gradient accumulator (and the stream it was made on, the default one) alive
    # across calls, which a CUDA graph capture of the backward cannot wait on.
    runners: Dict[str, Tuple[Runner, list]] = {
        "triton": (lambda: na2d_qkv(leaf_qkv, k, d, s, rpb=leaf_rpb, backend="triton"), [leaf_qkv, leaf_rpb]),
        "triton no-rpb": (lambda: na2d_qkv(leaf_qkv, k, d, s, backend="triton"), [leaf_qkv]),
        "reference": (lambda: na2d(*leaf_qkv.unbind(3), k, d, s, rpb=leaf_rpb, backend="reference"),
                      [leaf_qkv, leaf_rpb]),
    }
    # flex and SDPA get their preferred layout, [B, heads, tokens, D], contiguous.
    heads_first = [t.detach().permute(0, 3, 1, 2, 4).reshape(B, heads, H * W, D).contiguous().requires_grad_(backward)
                   for t in qkv.unbind(3)]
    fq, fk, fv = heads_first
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        pass
    else:
        compiled = torch.compile(flex_attention, dynamic=False)
        mask_mod, _ = flex_mods(shape, None)
        block_mask = create_block_mask(mask_mod, None, None, H * W, H * W, device="cuda")
        _, score_mod = flex_mods(shape, leaf_rpb)
        runners["flex"] = (lambda: compiled(fq, fk, fv, score_mod=score_mod, block_mask=block_mask), heads_first + [leaf_rpb])
        runners["flex no-rpb"] = (lambda: compiled(fq, fk, fv, block_mask=block_mask), heads_first)
    try:
        import natten
    except ImportError:
        pass
    else:
        # Without libnatten (a build without its CUDA kernels) natten runs on its flex backend, which
        # natten >= 0.20 compiles only once allowed (its default refuses: no backend is found).
        natten.allow_flex_compile(True, backprop=True)
        runners["natten no-rpb"] = (
            lambda: natten.na2d(*leaf_qkv.unbind(3), kernel_size=k, dilation=d, stride=s, torch_compile=True), [leaf_qkv]
        )
    runners["sdpa dense"] = (lambda: F.scaled_dot_product_attention(fq, fk, fv), heads_first)
    return runners


def _to_nhwc(out: torch.Tensor, shape: NAShape) -> torch.Tensor:
    """Outputs of the heads-first competitors back to ``[B, H, W, heads, D]``."""
    if out.dim() == 4:
        B, heads, _, D = out.shape
        return out.view(B, heads, shape.height, shape.width, D).permute(0, 2, 3, 1, 4)
    return out


def _with_backward(run: Runner, grad_out: torch.Tensor) -> Runner:
    def step():
        out = run()
        out.backward(grad_out.view_as(out))
    return step


def per_call_graph_ms(shape: NAShape, qkv: torch.Tensor, rpb: Optional[torch.Tensor]) -> float:
    """GPU ms per forward call of visattn's op, the calls replayed back to back from one CUDA graph,
    each on its own copy of ``qkv`` (at least 4 copies, together at least twice the L2)."""
    l2_bytes = torch.cuda.get_device_properties(qkv.device).L2_cache_size
    copies = [qkv.clone() for _ in range(max(4, math.ceil(2 * l2_bytes / (qkv.numel() * qkv.element_size()))))]

    def calls() -> None:
        with torch.no_grad():
            for packed in copies:
                na2d_qkv(packed, shape.kernel_size, shape.dilation, shape.stride, rpb=rpb, backend="triton")

    return graph_time_ms(calls) / len(copies)


def bench_shape(shape: NAShape, dtype: torch.dtype, bandwidth: float, competitors: List[str]) -> List[Dict[str, object]]:
    qkv, rpb = _make_inputs(shape, dtype)
    tensor_bytes = qkv.numel() // 3 * qkv.element_size()  # one of q, k, v, out
    results = []
    tuned_before = set(triton_na.TUNER.best)
    for mode in ("fwd", "fwd+bwd"):
        backward = mode == "fwd+bwd"
        # A fresh dynamo cache per case: flex recompiles per shape and grad mode, and past dynamo's
        # recompile limit it would silently fall back to the unfused eager implementation.
        torch._dynamo.reset()
        runners = _runners(shape, qkv, rpb, backward)
        grad_out = torch.randn(qkv.shape[:3] + qkv.shape[4:], device="cuda", dtype=dtype)
        row: Dict[str, object] = {"shape": shape.name, "mode": mode, "ms": {}, "graph_ms": {}, "peak_bytes": {},
                                  "errors": {}, "max_abs_diff": {}}
        if not backward:  # every output is checked against the fp32 reference
            q, k_, v = qkv.float().unbind(3)
            expected = {with_rpb: na2d(q, k_, v, shape.kernel_size, shape.dilation, shape.stride,
                                       rpb=rpb.float() if with_rpb else None, backend="reference")
                        for with_rpb in (True, False)}
        for name in competitors:
            if name not in runners:
                row["errors"][name] = "not installed"
                continue
            run, leaves = runners[name]
            fn = _with_backward(run, grad_out) if backward else run
            try:
                with torch.no_grad() if not backward else torch.enable_grad():
                    out = fn()  # compile / warm up
                    if not backward and name != "sdpa dense":
                        diff = _to_nhwc(out.float(), shape) - expected["no-rpb" not in name]
                        row["max_abs_diff"][name] = diff.abs().max().item()
                    row["ms"][name] = time_ms(fn, grad_to_none=leaves if backward else None)
                    for t in leaves:
                        t.grad = None
                    row["peak_bytes"][name] = peak_extra_bytes(fn)
                    if name != "reference":  # its many small launches make capture pointless
                        try:
                            row["graph_ms"][name] = graph_time_ms(fn)
                        except Exception as exc:
                            row["errors"][f"{name} graph"] = _error(exc)
            except Exception as exc:  # a competitor that cannot run this case is reported, not fatal
                row["errors"][name] = _error(exc)
            for t in leaves:
                t.grad = None
        if not backward:
            row["per_call_graph_ms"] = {}
            for name in ("triton", "triton no-rpb"):
                if name in row["graph_ms"]:
                    try:
                        row["per_call_graph_ms"][name] = per_call_graph_ms(shape, qkv, None if "no-rpb" in name else rpb)
                    except Exception as exc:  # reported like the other timings that cannot run
                        row["errors"][f"{name} per-call graph"] = _error(exc)
        # The launch candidates the tuner picked for this case (kernel, with / without rpb).
        row["tuned"] = {f"{key[0]}{' rpb' if key[5] else ''}": str(cfg) for key, cfg in triton_na.TUNER.best.items()
                        if key not in tuned_before}
        tuned_before = set(triton_na.TUNER.best)
        n_tensors = 4 if not backward else 8  # q, k, v, out (+ their gradients)
        row["io_bytes"] = n_tensors * tensor_bytes
        row["roofline_ms"] = 4 * tensor_bytes / bandwidth * 1e3 if not backward else None
        results.append(row)
    return results


def _error(exc: Exception) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"


def _ratio(row: Dict[str, object], slow: str, fast: str, timing: str = "ms") -> Optional[float]:
    ms = row.get(timing, {})
    return ms[slow] / ms[fast] if slow in ms and fast in ms else None


# The graph timings shown: visattn's and flex's (the targets are set against flex).
_GRAPH_COLUMNS = ["triton", "triton no-rpb", "flex", "flex no-rpb"]


def summarize(rows: List[Dict[str, object]]) -> str:
    table = []
    for row in rows:
        ms = row["ms"]
        out = {"shape": row["shape"], "mode": row["mode"]}
        for name in COMPETITORS:
            out[name] = f"{ms[name]:.3f}" if name in ms else ("-" if name not in row["errors"] else "n/a")
        diffs = row.get("max_abs_diff", {})
        if diffs:
            out["max |diff|"] = f"{max(diffs.values()):.1e}"
        for label, slow, fast in (("flex/triton", "flex", "triton"), ("flex/triton no-rpb", "flex no-rpb", "triton no-rpb"),
                                  ("natten/triton no-rpb", "natten no-rpb", "triton no-rpb")):
            r = _ratio(row, slow, fast)
            out[label] = f"{r:.2f}x" if r else "-"
        graph = row.get("graph_ms", {})
        for name in _GRAPH_COLUMNS:
            out[f"{name} graph"] = f"{graph[name]:.3f}" if name in graph else "-"
        for label, slow, fast in (("flex/triton graph", "flex", "triton"),
                                  ("flex/triton no-rpb graph", "flex no-rpb", "triton no-rpb")):
            r = _ratio(row, slow, fast, "graph_ms")
            out[label] = f"{r:.2f}x" if r else "-"
        if row["roofline_ms"] and "triton" in ms:
            # Against the kernels' GPU time where it was measured.
            out["triton/roofline"] = f"{graph.get('triton', ms['triton']) / row['roofline_ms']:.2f}x"
            per_call = row.get("per_call_graph_ms", {})
            if "triton" in per_call:
                out["triton per-call graph"] = f"{per_call['triton']:.4f}"
                out["per-call/roofline"] = f"{per_call['triton'] / row['roofline_ms']:.2f}x"
        if row["mode"] == "fwd+bwd":
            # What a call allocates on top of its inputs (output, gradients, workspace; for visattn
            # also the packed qkv gradient autograd stacks from dq, dk, dv), over q, k, v, out and grads.
            for name in ("triton", "flex"):
                if name in row["peak_bytes"]:
                    out[f"{name} extra/io"] = f"{row['peak_bytes'][name] / row['io_bytes']:.2f}x"
        table.append(out)
    columns = (["shape", "mode"] + COMPETITORS + ["flex/triton", "flex/triton no-rpb", "natten/triton no-rpb"]
               + [f"{name} graph" for name in _GRAPH_COLUMNS] + ["flex/triton graph", "flex/triton no-rpb graph",
                                                                 "triton/roofline", "triton per-call graph",
                                                                 "per-call/roofline", "triton extra/io", "flex extra/io",
                                                                 "max |diff|"])
    text = format_table(table, columns)
    errors = sorted({f"{name}: {err}" for row in rows for name, err in row["errors"].items()})
    return text + ("\n\nnot run: " + "; ".join(errors) if errors else "")


def plot(rows: List[Dict[str, object]], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(16, 5), sharey=False)
    for ax, mode in zip(axes, ("fwd", "fwd+bwd")):
        mode_rows = [r for r in rows if r["mode"] == mode]
        width = 0.8 / len(COMPETITORS)
        for i, name in enumerate(COMPETITORS):
            xs = [j + i * width for j, r in enumerate(mode_rows) if name in r["ms"]]
            ys = [r["ms"][name] for r in mode_rows if name in r["ms"]]
            ax.bar(xs, ys, width, label=name)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(mode_rows))])
        ax.set_xticklabels([r["shape"] for r in mode_rows], rotation=20, ha="right", fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("ms (median, log scale)")
        ax.set_title(f"{mode}")
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(shapes: List[NAShape], competitors: List[str], out_dir: str, dtype: torch.dtype = torch.bfloat16) -> Dict[str, object]:
    require_cuda()
    import triton

    bandwidth = copy_bandwidth()
    rows: List[Dict[str, object]] = []
    payload = {
        "device": device_name(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "dtype": str(dtype).replace("torch.", ""),
        "copy_bandwidth_GBps": bandwidth / 1e9,
        "shapes": [],
        "rows": rows,
    }
    title = f"neighborhood attention, {payload['dtype']}, {payload['device']}, {payload['date']}"
    print(f"{title}; copy bandwidth {bandwidth / 1e9:.0f} GB/s", flush=True)
    for shape in shapes:
        shape_rows = bench_shape(shape, dtype, bandwidth, competitors)
        rows.extend(shape_rows)
        payload["shapes"].append(asdict(shape))
        # Progress: this shape's rows and tuned launches, and the results so far on disk, so a run
        # stopped partway (a time limit) keeps the shapes it finished.
        print(summarize(shape_rows), flush=True)
        for row in shape_rows:
            if row.get("tuned"):
                print(f"tuned ({row['shape']} {row['mode']}): "
                      + ", ".join(f"{kind} {cfg}" for kind, cfg in row["tuned"].items()), flush=True)
        save_results(out_dir, "na", payload, lambda path: plot(rows, path, title))
    print(summarize(rows))
    return payload


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shapes", nargs="+", metavar="NAME", help="subset of shape names (default: all)")
    parser.add_argument("--competitors", nargs="+", default=COMPETITORS, choices=COMPETITORS, metavar="NAME",
                        help=f"subset of {COMPETITORS}")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--out", default="benchmarks/results", help="folder for na.json and na.png")


def main(args: argparse.Namespace) -> int:
    shapes = select_shapes(SHAPES, args.shapes)
    run(shapes, list(args.competitors), args.out, getattr(torch, args.dtype))
    return 0
