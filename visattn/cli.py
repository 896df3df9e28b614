"""The ``visattn`` command line: ``list``, ``info NAME``, ``demo`` and ``bench``."""
import argparse
import difflib
import json
import os
import sys
from typing import Dict, List, NoReturn, Optional, Sequence

from timm.models import get_arch_pretrained_cfgs

from visattn import profile


def _fail(message: str) -> NoReturn:
    """Print an argparse-style error and exit with argparse's usage-error status (2)."""
    print(f"visattn: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _official_names(names: Sequence[str]) -> Dict[str, str]:
    """Official name (of every pretrained tag) -> visattn model name."""
    return {
        profile.official_name(cfg.to_dict()): name
        for name in names
        for cfg in get_arch_pretrained_cfgs(name).values()
    }


def _close_matches(query: str, names: Sequence[str]) -> List[str]:
    """Registered names close to ``query``: by official name first, then by name (with or without ``visattn_``)."""
    official = _official_names(names)
    found = [official[o] for o in difflib.get_close_matches(query, list(official), n=2, cutoff=0.8)]
    found += difflib.get_close_matches(query, names, n=3, cutoff=0.6)
    if not query.startswith("visattn_"):
        found += difflib.get_close_matches(f"visattn_{query}", names, n=3, cutoff=0.6)
    return list(dict.fromkeys(found))[:3]


def _no_match(query: str, names: Sequence[str]) -> NoReturn:
    is_pattern = any(c in query for c in "*?[")
    close = [] if is_pattern else _close_matches(query, names)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    _fail(f"no visattn model matches {query!r}{hint} (`visattn list` shows them all)")


def resolve_model(name: str) -> str:
    """``name`` if it is a registered visattn model; otherwise exits 2 naming close matches."""
    names = profile.list_visattn_models()
    if name not in names:
        _no_match(name, names)
    return name


def select_models(patterns: Sequence[str]) -> List[str]:
    """Registered names matching any of the wildcard ``patterns``; exits 2 on a pattern matching none."""
    names = profile.list_visattn_models()
    selected = set()
    for pattern in patterns:
        matches = profile.list_visattn_models(pattern)
        if not matches:
            _no_match(pattern, names)
        selected.update(matches)
    return sorted(selected)


def _cmd_list(args: argparse.Namespace) -> int:
    rows = []
    for name in select_models([args.filter]):
        s = profile.model_summary(name, gmacs=not args.no_gmacs)
        rows.append({
            "model": name,
            "official": s["official"],
            "params (M)": f"{s['params_m']:.2f}",
            "GMACs": None if s["gmacs"] is None else f"{s['gmacs']:.2f}",
            "input": "x".join(str(d) for d in s["input_size"][1:]),
        })
    columns = ["model", "official", "params (M)"] + ([] if args.no_gmacs else ["GMACs"]) + ["input"]
    print(profile.format_table(rows, columns))
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    name = resolve_model(args.name)
    s = profile.model_summary(name)
    print(f"model: {name}")
    print(f"official name: {s['official']}")
    print(f"params: {s['params']:,} ({s['params_m']:.2f} M)")
    print(f"GMACs: {s['gmacs']:.2f} at batch 1")
    print(f"input size: {s['input_size']}")
    print(f"feature strides: {s['strides']}")
    print(f"feature channels: {s['channels']}")
    print(f"pretrained tags: {', '.join(cfg.split('.', 1)[1] for cfg in get_arch_pretrained_cfgs(name))}")
    print(f"pretrained_cfg ({name}.{s['tag']}):")
    for key, value in s["pretrained_cfg"].items():
        print(f"  {key}: {json.dumps(value, default=str)}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    names = select_models(args.models) if args.models else None
    rows = [
        {
            "model": row["name"],
            "params (M)": f"{row['params_m']:.2f}",
            "GMACs": f"{row['gmacs']:.2f}",
            "output shape": "x".join(str(d) for d in row["output_shape"]),
            "ms": f"{row['ms']:.1f}",
        }
        for row in profile.run_demo(names, device=args.device)
    ]
    print(profile.format_table(rows, ["model", "params (M)", "GMACs", "output shape", "ms"]))
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    # Imported here: the benchmarks pull in triton and (for plots) matplotlib.
    from visattn.bench import model as bench_model, na as bench_na, routed as bench_routed

    return {"na": bench_na, "routed": bench_routed, "model": bench_model}[args.bench].main(args)


def build_parser() -> argparse.ArgumentParser:
    """The ``visattn`` argument parser with its ``list``, ``info``, ``demo`` and ``bench`` subcommands."""
    from visattn.bench import model as bench_model, na as bench_na, routed as bench_routed

    parser = argparse.ArgumentParser(prog="visattn", description="visattn: timm-compatible attention vision models")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{list,info,demo,bench}")

    p = sub.add_parser("list", help="registered models with official name, params and GMACs")
    p.add_argument("--filter", default="visattn_*", metavar="PATTERN", help="wildcard pattern (default: visattn_*)")
    p.add_argument("--no-gmacs", action="store_true", help="skip the GMAC count (faster)")
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser("info", help="pretrained cfg, input size, feature strides/channels and size of one model")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("demo", help="build models with random weights, run them on a photo, print a table")
    p.add_argument("--models", nargs="+", metavar="PATTERN", help="names or wildcard patterns (default: all)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("bench", help="GPU benchmarks: kernels against their alternatives, whole-model training")
    bench = p.add_subparsers(dest="bench", required=True, metavar="{na,routed,model}")
    for name, module, help_text in (
        ("na", bench_na, "neighborhood attention: Triton vs flex_attention, natten, reference, dense SDPA"),
        ("routed", bench_routed, "bi-level routing attention: Triton routed kernels vs the official gather"),
        ("model", bench_model, "training throughput: visattn models on each backend vs timm's Swin"),
    ):
        module.add_arguments(bench.add_parser(name, help=help_text, description=module.__doc__))
    p.set_defaults(func=_cmd_bench)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``visattn`` command; returns the exit status (errors raise SystemExit(2))."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:
        # Output piped into e.g. `head` that exited: stop quietly, and keep the interpreter's
        # final flush of stdout from raising again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
