"""The ``visattn`` command line: ``list``, ``info NAME``, ``demo``, ``bench``, ``upscale`` and ``sr-eval``."""
import argparse
import difflib
import json
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, NoReturn, Optional, Sequence

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
    if s["strides"]:
        print(f"feature strides: {s['strides']}")
        print(f"feature channels: {s['channels']}")
    tags = [cfg.split(".", 1)[1] for cfg in get_arch_pretrained_cfgs(name) if "." in cfg]
    print(f"pretrained tags: {', '.join(tags) if tags else 'none (no released weights)'}")
    print(f"pretrained_cfg ({name}{'.' + s['tag'] if s['tag'] else ''}):")
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


# The benchmarks and what each times; a benchmark's module (triton, flex_attention, matplotlib)
# is imported only when it runs, so the other commands do not pay for it.
BENCHMARKS = {
    "na": "neighborhood attention: Triton vs flex_attention, natten, reference, dense SDPA",
    "routed": "bi-level routing attention: Triton routed kernels vs the official layer and the gather",
    "model": "training throughput: visattn models on each backend vs timm's Swin",
    "sr": "super-resolution: HAT-S forward vs a faithful port of the official code; tiled 2048² HAT x4 memory",
    "launch": "host time per call of the Triton ops: direct kernel launches vs JITFunction.run",
    "dwconv": "depthwise conv + residual (BiFormer's position conv and LePE): Triton vs nn.Conv2d and an add",
}


def _cmd_bench(args: argparse.Namespace) -> int:
    import importlib

    module = importlib.import_module(f"visattn.bench.{args.bench}")
    parser = argparse.ArgumentParser(prog=f"visattn bench {args.bench}", description=module.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(parser)
    return module.main(parser.parse_args(args.bench_args))


# ---------------------------------------------------------------------------------------------
# super-resolution: `visattn upscale` and `visattn sr-eval`

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def _one_line(error: BaseException, limit: int = 400) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    text = f"{type(error).__name__}: {text}" if not isinstance(error, (OSError, ValueError)) else text
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _sr_device(name: Optional[str]) -> str:
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        _fail(f"--device must be cpu or cuda (or cuda:N), got {name!r}")
    if device.type not in ("cpu", "cuda"):
        _fail(f"--device must be cpu or cuda (or cuda:N), got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        _fail("--device cuda: no CUDA device is available (use --device cpu)")
    return name


def _create_sr_model(name: str, weights: Optional[str]) -> Any:
    """``timm.create_model(name)``, with ``weights`` loaded through the model's checkpoint filter; exits 2 on errors."""
    import timm

    from visattn.sr import _model_scale

    if not timm.is_model(name):
        close = _close_matches(name, profile.list_visattn_models())
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        _fail(f"no model named {name!r}{hint} (`visattn list` shows the visattn models)")
    if weights is None and timm.models.get_pretrained_cfg(name).file:
        model = timm.create_model(name, pretrained=True)  # weights bundled with visattn
    elif weights is None:
        model = timm.create_model(name, pretrained=False)
        print(f"visattn: warning: no --weights given, {name} has random weights", file=sys.stderr)
    else:
        if not os.path.isfile(weights):
            _fail(f"--weights {weights}: no such file")
        try:
            # pretrained_cfg_overlay=dict(file=...) makes timm load this file (instead of the cfg's
            # url / hub id) and pass it through the model's checkpoint_filter_fn, then load strictly.
            model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=weights))
        except Exception as error:  # noqa: BLE001 - any failure to load is reported on one line
            _fail(f"cannot load --weights {weights} into {name}: {_one_line(error)}")
    try:
        scale = _model_scale(model)
    except ValueError as error:
        _fail(f"{name}: {error}")
    if scale is None:
        _fail(f"{name} is not a super-resolution model (it has no `upscale` attribute)")
    return model


def _read_image(path: str, purpose: str) -> Any:
    """An 8-bit image from ``path`` as a PIL image; exits 2 on unreadable or unsupported files.

    ``purpose='upscale'``: EXIF orientation applied; kept as RGB, L (gray) or RGBA (palette and
    gray+alpha images are expanded). ``purpose='eval'``: always RGB (gray replicated, alpha
    dropped, as an OpenCV colour read does).
    """
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as opened:
            opened.load()
            image = ImageOps.exif_transpose(opened) if purpose == "upscale" else opened.copy()
    except FileNotFoundError:
        _fail(f"cannot read image {path}: no such file")
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as error:
        _fail(f"cannot read image {path}: {_one_line(error)}")
    mode = image.mode
    if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        _fail(f"unsupported image {path}: mode {mode!r} (16-bit or float); convert it to 8-bit RGB first")
    if purpose == "eval":
        return image if mode == "RGB" else image.convert("RGB")
    if mode in ("RGB", "L", "RGBA"):
        return image
    if mode == "1":
        return image.convert("L")
    if mode in ("LA", "La", "PA", "RGBa") or (mode == "P" and "transparency" in image.info):
        return image.convert("RGBA")
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as error:
        _fail(f"unsupported image {path}: mode {mode!r} ({_one_line(error)})")


def _cmd_upscale(args: argparse.Namespace) -> int:
    from visattn.sr import upscale

    outdir = Path(args.output)
    targets: Dict[Path, str] = {}
    for source in args.inputs:
        target = (outdir / Path(source).name).with_suffix(".png")
        if target.resolve() in targets:
            _fail(f"inputs {targets[target.resolve()]} and {source} would both be written to {target}")
        if target.resolve() == Path(source).resolve():
            _fail(f"{source} would be overwritten by its own output; choose another -o directory")
        targets[target.resolve()] = source
    device = _sr_device(args.device)
    model = _create_sr_model(args.model, args.weights)
    outdir.mkdir(parents=True, exist_ok=True)
    for source in args.inputs:
        image = _read_image(source, "upscale")
        try:
            result = upscale(image, model, tile=args.tile, tile_overlap=args.tile_overlap, device=device,
                             progress=sys.stderr.isatty())
        except ValueError as error:
            _fail(f"{source}: {_one_line(error)}")
        target = (outdir / Path(source).name).with_suffix(".png")
        try:
            result.save(target)
        except OSError as error:
            _fail(f"cannot write {target}: {_one_line(error)}")
        print(f"{target}  {image.width}x{image.height} -> {result.width}x{result.height}")
    return 0


def _hr_images(hr_dir: str) -> List[Path]:
    root = Path(hr_dir)
    if not root.is_dir():
        _fail(f"--hr-dir {hr_dir}: not a directory")
    files = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES)
    if not files:
        _fail(f"--hr-dir {hr_dir}: no images ({', '.join(_IMAGE_SUFFIXES)})")
    return files


def _save_comparison(path: str, model_name: str, scale: int, panels: List[Dict[str, Any]]) -> None:
    """A grid of centre crops, one row per image: bicubic | model | HR, with PSNR/SSIM (Y) in the titles."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        _fail("--save-comparison needs matplotlib (pip install matplotlib)")
    fig = Figure(figsize=(9, 3.2 * len(panels)), layout="constrained")
    axes = fig.subplots(len(panels), 3, squeeze=False)
    for row, panel in zip(axes, panels):
        hr = panel["hr"]
        H, W = hr.shape[:2]
        side = min(H, W, 48 * scale)
        y0, x0 = (H - side) // 2, (W - side) // 2
        crop = (slice(y0, y0 + side), slice(x0, x0 + side))
        titles = (f"bicubic  {panel['bic_psnr']:.2f} dB / {panel['bic_ssim']:.4f}",
                  f"{model_name}  {panel['psnr']:.2f} dB / {panel['ssim']:.4f}",
                  f"HR ({panel['name']})")
        for ax, image, title in zip(row, (panel["bicubic"], panel["sr"], hr), titles):
            ax.imshow(image[crop], interpolation="nearest")
            ax.set_title(title, fontsize=9)
            ax.set_axis_off()
    fig.suptitle(f"x{scale} super-resolution, centre crops (PSNR/SSIM on Y, crop_border={scale})", fontsize=10)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(path, dpi=100)
    except (OSError, ValueError) as error:
        _fail(f"cannot write --save-comparison {path}: {_one_line(error)}")


_COMPARISON_ROWS = 4


def _cmd_sr_eval(args: argparse.Namespace) -> int:
    import numpy as np

    from visattn.metrics import imresize_bicubic, psnr, ssim
    from visattn.sr import upscale

    files = _hr_images(args.hr_dir)
    device = _sr_device(args.device)
    model = _create_sr_model(args.model, args.weights)
    scale = int(model.upscale)
    if args.scale is not None and args.scale != scale:
        _fail(f"--scale {args.scale} does not match {args.model}, an x{scale} model")
    if args.save_comparison and not args.save_comparison.lower().endswith(".png"):
        _fail(f"--save-comparison must name a .png file, got {args.save_comparison}")

    rows, panels = [], []
    for path in files:
        hr = np.asarray(_read_image(str(path), "eval"))
        H, W = hr.shape[0] - hr.shape[0] % scale, hr.shape[1] - hr.shape[1] % scale
        if H == 0 or W == 0:
            _fail(f"{path}: {hr.shape[1]}x{hr.shape[0]} is smaller than the scale {scale}")
        hr = hr[:H, :W]  # mod-crop
        lr = imresize_bicubic(hr, 1 / scale)  # MATLAB imresize of a uint8 image: rounded to uint8
        bicubic = imresize_bicubic(lr, scale)
        try:
            sr = upscale(lr, model, tile=args.tile, tile_overlap=args.tile_overlap, device=device, progress=False)
            values = dict(psnr=psnr(sr, hr, scale), ssim=ssim(sr, hr, scale),
                          bic_psnr=psnr(bicubic, hr, scale), bic_ssim=ssim(bicubic, hr, scale))
        except ValueError as error:
            _fail(f"{path}: {_one_line(error)}")
        rows.append(dict(name=path.name, size=f"{W}x{H}", **values))
        if len(panels) < _COMPARISON_ROWS:
            panels.append(dict(name=path.name, hr=hr, sr=sr, bicubic=bicubic, **values))

    mean = {key: float(np.mean([row[key] for row in rows])) for key in ("psnr", "ssim", "bic_psnr", "bic_ssim")}
    rows.append(dict(name="mean", size="", **mean))
    table = [
        {"image": row["name"], "HR size": row["size"], "PSNR": f"{row['psnr']:.4f}", "SSIM": f"{row['ssim']:.4f}",
         "bicubic PSNR": f"{row['bic_psnr']:.4f}", "bicubic SSIM": f"{row['bic_ssim']:.4f}"}
        for row in rows
    ]
    print(f"{args.model} x{scale} on {len(files)} images from {args.hr_dir} "
          f"(Y channel, crop_border={scale}, LR = MATLAB bicubic x1/{scale})")
    print(profile.format_table(table, ["image", "HR size", "PSNR", "SSIM", "bicubic PSNR", "bicubic SSIM"]))
    if args.save_comparison:
        _save_comparison(args.save_comparison, args.model, scale, panels)
        print(f"comparison: {args.save_comparison}")
    return 0


def _tile_size(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


# visattn upscale's default: PAN x4 with the weights visattn ships (trained on scikit-image photos).
DEFAULT_UPSCALE_MODEL = "visattn_pan_x4.skimage"


def _add_sr_model_arguments(p: argparse.ArgumentParser, default_model: Optional[str] = None) -> None:
    p.add_argument("--model", required=default_model is None, default=default_model, metavar="NAME",
                   help="registered SR model (timm name[.tag]), e.g. an x4 model"
                        + (f" (default: {default_model}, bundled weights)" if default_model else ""))
    p.add_argument("--weights", metavar="FILE",
                   help="checkpoint (visattn or official layout; .pth/.safetensors) loaded through the model's "
                        "checkpoint filter; without it the model has random weights")
    p.add_argument("--tile", type=_tile_size, metavar="N",
                   help="run N x N LR tiles (e.g. 256) blended over --tile-overlap pixels (default: whole image)")
    p.add_argument("--tile-overlap", type=_non_negative, default=32, metavar="N",
                   help="overlap of neighbouring tiles in LR pixels (default: 32)")
    p.add_argument("--device", metavar="{cpu,cuda}", help="torch device (default: cuda if available, else cpu)")


def _check_sr_tiling(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if getattr(args, "tile", None) is not None and args.tile <= 2 * args.tile_overlap:
        parser.error(f"--tile ({args.tile}) must be larger than 2 * --tile-overlap ({2 * args.tile_overlap})")


def build_parser() -> argparse.ArgumentParser:
    """The ``visattn`` argument parser: ``list``, ``info``, ``demo``, ``bench``, ``upscale`` and ``sr-eval``."""
    parser = argparse.ArgumentParser(prog="visattn", description="visattn: timm-compatible attention vision models")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{list,info,demo,bench,upscale,sr-eval}")

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

    p = sub.add_parser("bench", help="GPU benchmarks: kernels against their alternatives, whole-model training",
                       description="GPU benchmarks (`visattn bench NAME --help` for a benchmark's options):\n"
                                   + "\n".join(f"  {name:7s} {text}" for name, text in BENCHMARKS.items()),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bench", choices=list(BENCHMARKS), metavar="NAME", help=f"one of {', '.join(BENCHMARKS)}")
    p.add_argument("bench_args", nargs=argparse.REMAINDER, metavar="...", help="the benchmark's options")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("upscale", help="super-resolve images with an SR model, writing PNGs",
                       description="Super-resolve each IN with an SR model and write OUTDIR/<IN name>.png. RGB, "
                                   "gray (kept gray) and RGBA (alpha upscaled bicubically) 8-bit images are read; "
                                   "unreadable or unsupported files stop with exit status 2.")
    p.add_argument("inputs", nargs="+", metavar="IN", help="input images")
    p.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="output directory (created if missing)")
    _add_sr_model_arguments(p, DEFAULT_UPSCALE_MODEL)
    p.set_defaults(func=_cmd_upscale)

    p = sub.add_parser("sr-eval", help="PSNR/SSIM (Y) of an SR model on a folder of HR images, vs bicubic",
                       description="For each HR image in --hr-dir: crop to a multiple of the scale, make the LR "
                                   "input with MATLAB-compatible bicubic x1/scale (rounded to uint8), run the model, "
                                   "and print PSNR/SSIM on the BT.601 Y channel with crop_border = scale (the "
                                   "BasicSR protocol), with MATLAB bicubic upsampling as the baseline, then the means.")
    _add_sr_model_arguments(p)
    p.add_argument("--hr-dir", required=True, metavar="DIR", help="folder of HR images (png/jpg/bmp/tif/webp)")
    p.add_argument("--scale", type=_tile_size, metavar="S",
                   help="scale factor; must match the model's (default: the model's `upscale`)")
    p.add_argument("--save-comparison", metavar="OUT.png",
                   help=f"save centre crops bicubic | model | HR of the first {_COMPARISON_ROWS} images (matplotlib)")
    p.set_defaults(func=_cmd_sr_eval)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``visattn`` command; returns the exit status (errors raise SystemExit(2))."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_sr_tiling(parser, args)
    try:
        return args.func(args)
    except BrokenPipeError:
        # Output piped into e.g. `head` that exited: stop quietly, and keep the interpreter's
        # final flush of stdout from raising again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
