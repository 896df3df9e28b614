"""Model listing, parameter / GMAC counts and the README's demo run."""
import time
from typing import Dict, Iterable, List, Optional, Sequence

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

import visattn.models  # noqa: F401  (registers the visattn_* models)


def list_visattn_models(pattern: str = "visattn_*") -> List[str]:
    """Registered visattn model names matching ``pattern`` (sorted)."""
    return sorted(timm.list_models(pattern))


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_gmacs(model: torch.nn.Module, input_size: Sequence[int]) -> float:
    """Multiply-accumulates (1e9) of one forward at batch 1, counted by torch's FlopCounterMode.

    The reference neighborhood attention is a gather plus two einsums, so its q.k and attn.v
    products are counted like any matmul.
    """
    x = torch.randn(1, *input_size)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model.eval()(x)
    return counter.get_total_flops() / 2 / 1e9


def official_name(pretrained_cfg: Dict) -> str:
    """The official model name recorded in a pretrained cfg's notes ("official name: xxx")."""
    for note in pretrained_cfg.get("notes") or ():
        if note.startswith("official name: "):
            return note[len("official name: "):]
    return ""


def model_summary(name: str, gmacs: bool = True) -> Dict:
    """Name, official name, params, GMACs, input size, feature strides/channels and weights of a model."""
    model = timm.create_model(name)
    cfg = model.pretrained_cfg
    return dict(
        name=name,
        official=official_name(cfg),
        params_m=count_params(model) / 1e6,
        gmacs=count_gmacs(model, cfg["input_size"]) if gmacs else None,
        input_size=tuple(cfg["input_size"]),
        strides=[f["reduction"] for f in model.feature_info],
        channels=[f["num_chs"] for f in model.feature_info],
        tag=cfg.get("tag"),
        url=cfg.get("url"),
        paper_ids=cfg.get("paper_ids"),
        pretrained_cfg=cfg,
    )


def run_demo(names: Optional[Iterable[str]] = None, device: str = "cpu", image=None) -> List[Dict]:
    """Build every (or each named) model with random weights, run it on a real photo, time it.

    The photo is scikit-image's astronaut (512x512 RGB) unless ``image`` (a PIL image) is given;
    it goes through timm's eval transform for each model's pretrained cfg.
    """
    from PIL import Image
    from tqdm import tqdm

    if image is None:
        from skimage.data import astronaut

        image = Image.fromarray(astronaut())
    rows = []
    for name in tqdm(list(names) if names is not None else list_visattn_models(), desc="models"):
        model = timm.create_model(name).eval().to(device)
        data_cfg = timm.data.resolve_data_config({}, model=model)
        x = timm.data.create_transform(**data_cfg)(image).unsqueeze(0).to(device)
        with torch.no_grad():
            model(x)  # warm-up
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            out = model(x)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            ms = (time.perf_counter() - start) * 1e3
        rows.append(dict(
            name=name,
            params_m=round(count_params(model) / 1e6, 2),
            gmacs=round(count_gmacs(model.cpu(), data_cfg["input_size"]), 2),
            output_shape=tuple(out.shape),
            ms=round(ms, 1),
        ))
    return rows


def format_table(rows: List[Dict], columns: Sequence[str]) -> str:
    """Rows as an aligned plain-text table with the given columns."""
    cells = [[str(c) for c in columns]] + [[str(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
