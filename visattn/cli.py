"""The ``visattn`` command line: list, info, demo."""
import argparse
import difflib
import json
import sys
from typing import List, Optional

from visattn import profile


def _resolve(name: str) -> str:
    names = profile.list_visattn_models()
    if name in names:
        return name
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see `visattn list`"
    raise SystemExit(_error(f"unknown model {name!r}{hint}"))


def _error(message: str) -> int:
    print(f"visattn: error: {message}", file=sys.stderr)
    return 2


def _cmd_list(args: argparse.Namespace) -> int:
    rows = []
    for name in profile.list_visattn_models(args.filter):
        s = profile.model_summary(name, gmacs=not args.no_gmacs)
        rows.append(dict(
            model=name,
            official=s["official"],
            params_m=f"{s['params_m']:.2f}",
            gmacs="" if s["gmacs"] is None else f"{s['gmacs']:.2f}",
            input=f"{s['input_size'][1]}x{s['input_size'][2]}",
        ))
    columns = ["model", "official", "params_m", "input"] + ([] if args.no_gmacs else ["gmacs"])
    print(profile.format_table(rows, columns))
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    s = profile.model_summary(_resolve(args.name), gmacs=not args.no_gmacs)
    print(f"model: {s['name']} (official: {s['official']})")
    print(f"params: {s['params_m']:.3f} M" + ("" if s["gmacs"] is None else f", GMACs: {s['gmacs']:.2f}"))
    print(f"input size: {s['input_size']}")
    print(f"feature strides: {s['strides']}")
    print(f"feature channels: {s['channels']}")
    print("pretrained_cfg:")
    for key, value in s["pretrained_cfg"].items():
        print(f"  {key}: {json.dumps(value, default=str)}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    names = None
    if args.models:
        names = sorted({n for pattern in args.models for n in profile.list_visattn_models(pattern)})
        if not names:
            return _error(f"no model matches {args.models}")
    rows = profile.run_demo(names, device=args.device)
    print(profile.format_table(rows, ["name", "params_m", "gmacs", "output_shape", "ms"]))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="visattn", description="visattn model zoo")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("list", help="registered models with params and GMACs")
    p.add_argument("--filter", default="visattn_*", help="wildcard pattern (default visattn_*)")
    p.add_argument("--no-gmacs", action="store_true", help="skip the (slower) GMAC count")
    p.set_defaults(func=_cmd_list)
    p = sub.add_parser("info", help="pretrained cfg, input size and feature strides of one model")
    p.add_argument("name")
    p.add_argument("--no-gmacs", action="store_true")
    p.set_defaults(func=_cmd_info)
    p = sub.add_parser("demo", help="build every model, run it on a real photo, print a table")
    p.add_argument("--models", nargs="*", help="wildcard patterns (default: all)")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
