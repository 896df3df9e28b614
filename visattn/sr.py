"""Super-resolution inference: :func:`upscale` runs a visattn SR model on an image, whole or in tiles.

visattn SR models take RGB in [0, 1] ``[B, 3, H, W]`` and return ``[B, 3, sH, sW]`` (see
``visattn/models/_sr_common.py``); :func:`upscale` does the conversions around that for uint8
arrays, PIL images and tensors, and tiles large images so that they fit in memory.
"""
from __future__ import annotations

import copy
import itertools
import math
from contextlib import nullcontext
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["upscale"]

# Weights of the gray output of a gray input (ITU-R BT.601 luma, as PIL's convert('L')).
_LUMA = (0.299, 0.587, 0.114)

_EXPECTED = ("a uint8 H x W x 3 numpy array (or H x W / H x W x 1 gray, H x W x 4 RGBA), a PIL image "
             "(mode 'RGB', 'L' or 'RGBA'), or a float tensor [3, H, W] / [B, 3, H, W] in [0, 1]")

_HALF_DTYPES = (torch.float16, torch.bfloat16)


def _is_pil(image: Any) -> bool:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow comes with torchvision
        return False
    return isinstance(image, Image.Image)


# ---------------------------------------------------------------------------------------------
# input / output conversion

def _from_uint8(array: np.ndarray) -> torch.Tensor:
    """``H x W x C`` uint8 -> float32 ``[1, C, H, W]`` in [0, 1]."""
    if not array.flags.writeable:  # e.g. np.asarray(pil_image); torch.from_numpy wants writable memory
        array = array.copy()
    return torch.from_numpy(array).permute(2, 0, 1)[None].float().div_(255.0)


def _to_uint8(batch: torch.Tensor) -> np.ndarray:
    """float ``[1, C, H, W]`` in [0, 1] -> uint8 ``H x W x C`` (times 255, rounded)."""
    return batch[0].permute(1, 2, 0).mul(255.0).round_().clamp_(0, 255).to(torch.uint8).cpu().numpy()


def _split_image(image: Any) -> Tuple[torch.Tensor, Optional[torch.Tensor], Dict[str, Any]]:
    """``image`` -> (RGB float ``[B, 3, H, W]`` in [0, 1], alpha ``[B, 1, H, W]`` or None, how to convert back)."""
    if isinstance(image, torch.Tensor):
        if not image.is_floating_point():
            raise ValueError(f"upscale expects a float tensor in [0, 1], got {image.dtype} "
                             f"(convert uint8 tensors with x.float() / 255)")
        if image.ndim not in (3, 4) or image.shape[-3] != 3:
            raise ValueError(f"upscale expects a float tensor [3, H, W] or [B, 3, H, W] in [0, 1], "
                             f"got shape {tuple(image.shape)}")
        if image.shape[-1] == 0 or image.shape[-2] == 0 or (image.ndim == 4 and image.shape[0] == 0):
            raise ValueError(f"upscale got an empty image tensor {tuple(image.shape)}")
        meta = dict(kind="tensor", ndim=image.ndim, dtype=image.dtype, device=image.device)
        rgb = image if image.ndim == 4 else image[None]
        return rgb.float(), None, meta

    if _is_pil(image):
        if image.mode not in ("RGB", "L", "RGBA"):
            raise ValueError(f"upscale expects a PIL image of mode 'RGB', 'L' or 'RGBA', got mode {image.mode!r} "
                             f"(convert it first, e.g. image.convert('RGB'))")
        rgb, alpha, meta = _split_image(np.asarray(image))
        meta.update(kind="pil")
        return rgb, alpha, meta

    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ValueError(f"upscale expects a uint8 numpy array, got dtype {image.dtype} "
                             f"(pass float images as a [3, H, W] tensor in [0, 1], e.g. "
                             f"torch.from_numpy(a).permute(2, 0, 1))")
        if image.ndim == 2:
            layout = "gray"
            image = image[:, :, None]
        elif image.ndim == 3 and image.shape[2] in (1, 3, 4):
            layout = {1: "gray1", 3: "rgb", 4: "rgba"}[image.shape[2]]
        else:
            raise ValueError(f"upscale expects a uint8 array H x W x 3 (RGB), H x W x 4 (RGBA), H x W or "
                             f"H x W x 1 (gray), got shape {image.shape}")
        if image.shape[0] == 0 or image.shape[1] == 0:
            raise ValueError(f"upscale got an empty image {image.shape}")
        x = _from_uint8(image)
        if layout in ("gray", "gray1"):
            return x.expand(-1, 3, -1, -1).contiguous(), None, dict(kind="array", layout=layout)
        if layout == "rgba":
            return x[:, :3].contiguous(), x[:, 3:].contiguous(), dict(kind="array", layout=layout)
        return x, None, dict(kind="array", layout=layout)

    raise ValueError(f"upscale expects {_EXPECTED}; got {type(image).__module__}.{type(image).__qualname__}")


def _join_image(rgb: torch.Tensor, alpha: Optional[torch.Tensor], meta: Dict[str, Any]) -> Any:
    """The output in the input's kind; ``rgb`` is float ``[B, 3, sH, sW]`` in [0, 1]."""
    if meta["kind"] == "tensor":
        out = rgb.to(device=meta["device"], dtype=meta["dtype"])
        return out if meta["ndim"] == 4 else out[0]
    layout = meta["layout"]
    rgb = rgb.cpu()
    if layout in ("gray", "gray1"):
        weights = torch.tensor(_LUMA, dtype=rgb.dtype).view(1, 3, 1, 1)
        out = _to_uint8((rgb * weights).sum(1, keepdim=True))
        out = out[:, :, 0] if layout == "gray" else out
    elif layout == "rgba":
        out = _to_uint8(torch.cat([rgb, alpha.cpu()], dim=1))
    else:
        out = _to_uint8(rgb)
    if meta["kind"] == "pil":
        from PIL import Image

        return Image.fromarray(out[:, :, 0] if out.ndim == 3 and out.shape[2] == 1 else out)
    return out


# ---------------------------------------------------------------------------------------------
# tiling

def _check_tiling(tile: Optional[int], overlap: int) -> None:
    if isinstance(overlap, bool) or not isinstance(overlap, (int, np.integer)) or overlap < 0:
        raise ValueError(f"tile_overlap must be an int >= 0, got {overlap!r}")
    if tile is None:
        return
    if isinstance(tile, bool) or not isinstance(tile, (int, np.integer)) or tile <= 0:
        raise ValueError(f"tile must be None (whole image) or a positive int, got {tile!r}")
    if tile <= 2 * overlap:
        raise ValueError(f"tile ({tile}) must be larger than 2 * tile_overlap ({2 * overlap}): "
                         f"use a larger tile or a smaller tile_overlap")


def _tile_starts(length: int, tile: int, overlap: int) -> List[int]:
    """Starts of the fewest ``tile``-long windows covering ``length`` with overlaps >= ``overlap``, evenly spread."""
    if length <= tile:
        return [0]
    n = math.ceil((length - overlap) / (tile - overlap))
    span = length - tile
    return [(k * span + (n - 1) // 2) // (n - 1) for k in range(n)]


def _blend_ramp(length: int, scale: int, overlap: int, lead: bool, trail: bool) -> torch.Tensor:
    """Blending weights ``[scale * length]`` of one tile along one axis.

    At an edge shared with a neighbouring tile the weight is 0 over the outer quarter of the
    overlap, rises linearly across its middle half and is 1 past its inner quarter (measured in LR
    pixels at the SR pixel centres), so two tiles overlapping by exactly ``overlap`` cross-fade
    linearly with weights summing to 1. Edges on the image border keep weight 1.
    """
    d = (torch.arange(scale * length, dtype=torch.float64) + 0.5) / scale
    w = torch.ones_like(d)
    if overlap == 0:
        return w
    margin, span = overlap / 4, overlap / 2
    if lead:
        w = torch.minimum(w, ((d - margin) / span).clamp(0, 1))
    if trail:
        w = torch.minimum(w, ((length - d - margin) / span).clamp(0, 1))
    return w


# ---------------------------------------------------------------------------------------------
# running the model

def _first_tensor(model: nn.Module, floating: bool = False) -> Optional[torch.Tensor]:
    for t in itertools.chain(model.parameters(), model.buffers()):
        if not floating or t.is_floating_point():
            return t
    return None


def _model_scale(model: nn.Module) -> Optional[int]:
    scale = getattr(model, "upscale", None)
    if scale is None:
        return None
    if isinstance(scale, bool) or not isinstance(scale, (int, np.integer)) or scale < 1:
        raise ValueError(f"model.upscale must be a positive int (the scale factor), got {scale!r}")
    return int(scale)


class _Runner:
    """Calls the model on ``[B, 3, h, w]`` pieces and checks that each output is ``[B, 3, s*h, s*w]``."""

    def __init__(self, model: nn.Module, device: torch.device, in_dtype: torch.dtype, autocast: Any,
                 scale: Optional[int]):
        self.model, self.device, self.in_dtype, self.autocast, self.scale = model, device, in_dtype, autocast, scale

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with self.autocast:
            out = self.model(x.to(device=self.device, dtype=self.in_dtype))
        if not isinstance(out, torch.Tensor):
            raise ValueError(f"an SR model must return a tensor [B, 3, sH, sW], got {type(out).__name__}")
        B, _, h, w = x.shape
        if self.scale is None:  # no `upscale` attribute: infer it from the first output
            if out.ndim == 4 and tuple(out.shape[:2]) == (B, 3) and out.shape[-2] % h == 0 \
                    and out.shape[-2] // h == out.shape[-1] / w:
                self.scale = out.shape[-2] // h
        s = self.scale
        if s is None or tuple(out.shape) != (B, 3, s * h, s * w):
            expected = f"[{B}, 3, {s}*{h}, {s}*{w}]" if s else f"[{B}, 3, s*{h}, s*{w}]"
            raise ValueError(f"the model returned {tuple(out.shape)} for a {tuple(x.shape)} input; "
                             f"an SR model must return {expected}")
        return out.float()


def _run_tiled(run: _Runner, x: torch.Tensor, tile: int, overlap: int, progress: bool) -> torch.Tensor:
    from tqdm.auto import tqdm

    B, _, H, W = x.shape
    th, tw = min(tile, H), min(tile, W)
    ys, xs = _tile_starts(H, tile, overlap), _tile_starts(W, tile, overlap)
    out = weight = None
    with tqdm(total=len(ys) * len(xs), desc="upscale", unit="tile", disable=not progress, leave=False) as bar:
        for i, y0 in enumerate(ys):
            for j, x0 in enumerate(xs):
                piece = run(x[:, :, y0:y0 + th, x0:x0 + tw]).to(x.device)
                s = run.scale
                if out is None:
                    out = torch.zeros(B, 3, s * H, s * W, dtype=torch.float32, device=x.device)
                    weight = torch.zeros(s * H, s * W, dtype=torch.float32, device=x.device)
                wy = _blend_ramp(th, s, overlap, lead=i > 0, trail=i < len(ys) - 1)
                wx = _blend_ramp(tw, s, overlap, lead=j > 0, trail=j < len(xs) - 1)
                w2 = (wy[:, None] * wx[None, :]).to(torch.float32).to(x.device)
                region = (slice(s * y0, s * (y0 + th)), slice(s * x0, s * (x0 + tw)))
                out[(slice(None), slice(None)) + region] += piece * w2
                weight[region] += w2
                bar.update(1)
    return out / weight


def upscale(
    image: Union[np.ndarray, torch.Tensor, Any],
    model: nn.Module,
    tile: Optional[int] = None,
    tile_overlap: int = 32,
    dtype: Optional[torch.dtype] = None,
    device: Optional[Union[str, torch.device]] = None,
    progress: bool = True,
) -> Union[np.ndarray, torch.Tensor, Any]:
    """Super-resolve ``image`` with the SR ``model``, returning the same kind of image ``s`` times larger.

    Args:
        image: one of
            - a uint8 numpy array ``H x W x 3`` (RGB) -> uint8 ``sH x sW x 3``;
            - a PIL image of mode ``'RGB'`` -> PIL ``'RGB'``;
            - a float tensor ``[3, H, W]`` or ``[B, 3, H, W]`` in [0, 1] -> float tensor ``[3, sH, sW]`` /
              ``[B, 3, sH, sW]`` in [0, 1], in the input's dtype and on the input's device;
            - gray: uint8 ``H x W`` or ``H x W x 1``, or PIL ``'L'``. The gray image is replicated to
              RGB, super-resolved, and the RGB result turned back to gray with BT.601 luma weights
              (0.299, 0.587, 0.114, as PIL's ``convert('L')``): returned as ``sH x sW``,
              ``sH x sW x 1`` or PIL ``'L'``, like the input;
            - RGBA: uint8 ``H x W x 4`` or PIL ``'RGBA'``. RGB goes through the model; alpha is
              upscaled by bicubic interpolation (clamped), not by the model; returned as RGBA.
            Anything else (other dtypes, channel counts, PIL modes; float arrays) raises a ValueError.
            uint8 / PIL outputs are the clamped result times 255, rounded.
        model: an SR model: ``[B, 3, h, w]`` in [0, 1] -> ``[B, 3, s*h, s*w]``, with an int
            ``upscale`` attribute (otherwise ``s`` is read off the output). It runs in ``eval()``
            mode under ``torch.no_grad()``; its train/eval mode is restored afterwards.
        tile: None runs the whole image at once. ``tile=N`` runs overlapping ``N x N`` tiles (in LR
            pixels; smaller at the image edges when the image is smaller than N) placed evenly with
            overlaps of at least ``tile_overlap``, and blends their outputs: at a shared edge a
            tile's weight is 0 over the outer quarter of the overlap, ramps linearly across the
            middle half and is 1 beyond, so there are no seams; overlaps of exactly
            ``tile_overlap`` cross-fade with weights summing to 1, others are normalised by the
            weight sum. For a fully convolutional model whose output depends only on input pixels
            within ``tile_overlap / 4`` LR pixels, the tiled result equals the untiled one up to
            float error. Must exceed ``2 * tile_overlap``.
        tile_overlap: overlap of neighbouring tiles in LR pixels (0: tiles abut, seams likely).
        dtype: None runs the model in its parameters' dtype. ``torch.float16`` / ``torch.bfloat16``
            on CUDA run it under ``torch.autocast``; on other devices (or for ``float32`` /
            ``float64``) a copy of the model cast to ``dtype`` is run, leaving ``model`` untouched.
        device: where the model runs; ``model`` is moved there (in place). None: where its
            parameters are.
        progress: show a tqdm progress bar over the tiles (tiled runs only).

    Returns:
        The super-resolved image, clamped to [0, 1] (before any uint8 conversion).

    Raises:
        ValueError: an unsupported image (naming what is expected), bad ``tile`` / ``tile_overlap``
            / ``dtype``, or a model output that is not ``[B, 3, s*h, s*w]``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (an SR model), got {type(model).__name__}")
    _check_tiling(tile, tile_overlap)
    if dtype is not None and dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise ValueError(f"dtype must be None, torch.float16, torch.bfloat16, torch.float32 or torch.float64, "
                         f"got {dtype!r}")
    rgb, alpha, meta = _split_image(image)

    if device is not None:
        model.to(device)
        run_device = torch.device(device)
    else:
        first = _first_tensor(model)
        run_device = first.device if first is not None else torch.device("cpu")
    floating = _first_tensor(model, floating=True)
    param_dtype = floating.dtype if floating is not None else torch.float32

    run_model, in_dtype, autocast = model, param_dtype, nullcontext()
    if dtype in _HALF_DTYPES and run_device.type == "cuda":
        autocast = torch.autocast(device_type="cuda", dtype=dtype)
    elif dtype is not None and dtype != param_dtype:
        run_model, in_dtype = copy.deepcopy(model).to(dtype), dtype

    was_training = model.training
    model.eval()
    run_model.eval()
    try:
        run = _Runner(run_model, run_device, in_dtype, autocast, _model_scale(model))
        with torch.no_grad():
            if tile is None:
                out = run(rgb).to(rgb.device)
            else:
                out = _run_tiled(run, rgb, int(tile), int(tile_overlap), progress)
    finally:
        model.train(was_training)
    out = out.clamp_(0.0, 1.0)
    if alpha is not None:
        alpha = F.interpolate(alpha, size=out.shape[-2:], mode="bicubic", align_corners=False).clamp_(0.0, 1.0)
    return _join_image(out, alpha, meta)
