"""Model listing, parameter / GMAC counts, model summaries and the README's demo run."""
import fnmatch
import time
from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

import numpy as np
import timm
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

import visattn.models  # noqa: F401  (registers the visattn_* models)

OFFICIAL_NAME_NOTE = "official name: "


def list_visattn_models(pattern: str = "visattn_*") -> list[str]:
    """Registered visattn model names matching the wildcard ``pattern``, sorted."""
    return sorted(fnmatch.filter(timm.list_models("visattn_*"), pattern))


def count_params(model: torch.nn.Module) -> int:
    """Number of parameters (trainable or not) of ``model``."""
    return sum(p.numel() for p in model.parameters())


def _device_of(model: torch.nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def count_gmacs(model: torch.nn.Module, input_size: Sequence[int]) -> float:
    """Multiply-accumulates (in 1e9) of one eval-mode forward at batch 1, ``input_size`` = (C, H, W).

    Counted by torch's FlopCounterMode (flops / 2). The reference neighborhood attention is a
    gather plus two einsums, so its q.k and attn.v products are counted like any matmul; like
    fvcore (the official numbers), element-wise ops are not counted. Works on a model built on
    the meta device, which is how summaries of the large models stay cheap.
    """
    x = torch.randn(1, *input_size, device=_device_of(model))
    counter = FlopCounterMode(display=False)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), counter:
            model(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops() / 2 / 1e9


def official_name(pretrained_cfg: Dict[str, Any]) -> str:
    """The official model name recorded in a pretrained cfg's notes ("official name: xxx"), or ""."""
    for note in pretrained_cfg.get("notes") or ():
        if note.startswith(OFFICIAL_NAME_NOTE):
            return note[len(OFFICIAL_NAME_NOTE):]
    return ""


def model_summary(name: str, gmacs: bool = True) -> Dict[str, Any]:
    """Name, official name, params, GMACs, input size, feature strides/channels and weights of a model.

    The model is built on the meta device (no memory, no random init), so this takes about a
    second even for the 200M-parameter models. ``gmacs=False`` skips the counting forward.
    """
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False)
    cfg = model.pretrained_cfg
    params = count_params(model)
    return dict(
        name=name,
        official=official_name(cfg),
        params=params,
        params_m=params / 1e6,
        gmacs=count_gmacs(model, cfg["input_size"]) if gmacs else None,
        input_size=tuple(cfg["input_size"]),
        # Super-resolution models (image to image) have no feature pyramid.
        strides=[info["reduction"] for info in getattr(model, "feature_info", ())],
        channels=[info["num_chs"] for info in getattr(model, "feature_info", ())],
        tag=cfg.get("tag"),
        url=cfg.get("url"),
        paper_ids=cfg.get("paper_ids"),
        pretrained_cfg=cfg,
    )


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_demo(
    names: Optional[Iterable[str]] = None,
    device: Union[str, torch.device] = "cpu",
    image: Optional[Union[Image.Image, np.ndarray]] = None,
) -> List[Dict[str, Any]]:
    """The README's main job: build each model (random init), run it on a real photo, time it.

    ``names`` defaults to every registered visattn model. The photo is scikit-image's astronaut
    (512x512 RGB) unless ``image`` (a PIL image or an HxWx3 uint8 array) is given; it goes
    through timm's eval transform for each model's data config. Returns one row per model:
    name, params_m, gmacs, output_shape, ms (one forward at batch 1, after a warm-up).
    """
    from tqdm import tqdm

    if image is None:
        from skimage.data import astronaut

        image = astronaut()
    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image))
    device = torch.device(device)
    rows = []
    for name in tqdm(list(names) if names is not None else list_visattn_models(), desc="visattn demo", unit="model"):
        model = timm.create_model(name, pretrained=False).eval().to(device)
        data_cfg = timm.data.resolve_data_config({}, model=model)
        x = timm.data.create_transform(**data_cfg)(image).unsqueeze(0).to(device)
        # The counting forward runs the same ops at the same input size: it is the warm-up.
        gmacs = count_gmacs(model, data_cfg["input_size"])
        with torch.no_grad():
            _synchronize(device)
            start = time.perf_counter()
            out = model(x)
            _synchronize(device)
            ms = (time.perf_counter() - start) * 1e3
        rows.append(dict(
            name=name,
            params_m=round(count_params(model) / 1e6, 2),
            gmacs=round(gmacs, 2),
            output_shape=tuple(out.shape),
            ms=round(ms, 1),
        ))
        # Free this model before building the next: the large ones take ~0.8 GB each.
        del model, out
    return rows


def _is_number(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def format_table(rows: Sequence[Dict[str, Any]], columns: Sequence[str]) -> str:
    """``rows`` as an aligned plain-text table of ``columns``; all-number columns are right-aligned."""
    numeric = [bool(rows) and all(_is_number(row.get(c)) for row in rows) for c in columns]
    cells = [[str(c) for c in columns]] + [[str(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]

    def render(line: List[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(line, widths, numeric)).rstrip()

    return "\n".join([render(cells[0]), "  ".join("-" * w for w in widths)] + [render(line) for line in cells[1:]])
