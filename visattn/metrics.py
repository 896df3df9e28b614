"""Super-resolution metrics and the MATLAB-compatible bicubic resize, following the BasicSR protocol.

The usual SR benchmark numbers (Set5, Set14, BSD100, Urban100, Manga109) are computed like this:

1. the HR image is cropped to a multiple of the scale ``s`` and its LR input made with MATLAB's
   ``imresize(hr, 1/s, 'bicubic')`` (antialiased), rounded to uint8 (:func:`imresize_bicubic`);
2. the SR output is clamped to [0, 1], multiplied by 255 and rounded to uint8;
3. ``crop_border = s`` pixels are dropped on every side;
4. PSNR and SSIM are computed in float64 on the [0, 255] scale, on the Y channel of ITU-R BT.601
   YCbCr (:func:`rgb_to_y`, MATLAB's ``rgb2ycbcr``; not rounded), per image, then averaged.

:func:`psnr` and :func:`ssim` do steps 2-4 for one image pair. Everything here is NumPy;
:func:`imresize_bicubic` also resizes torch tensors, but torch is imported only for those.
"""
from __future__ import annotations

import math
from typing import Any, Tuple

import numpy as np

__all__ = ["imresize_bicubic", "psnr", "rgb_to_y", "ssim"]

# ITU-R BT.601 luma of MATLAB's rgb2ycbcr: Y = 16 + 65.481 R + 128.553 G + 24.966 B for RGB in [0, 1].
_Y_OFFSET = 16.0
_Y_WEIGHTS = (65.481, 128.553, 24.966)

# SSIM (Wang et al. 2004, as in their MATLAB code and BasicSR): 11x11 Gaussian window, sigma 1.5.
_SSIM_WINDOW = 11
_SSIM_SIGMA = 1.5
_SSIM_C1 = (0.01 * 255) ** 2
_SSIM_C2 = (0.03 * 255) ** 2


def _is_torch_tensor(x: Any) -> bool:
    return type(x).__module__.split(".")[0] == "torch" and hasattr(x, "detach")


# ---------------------------------------------------------------------------------------------
# colour

def rgb_to_y(img: np.ndarray) -> np.ndarray:
    """Y (luma) of ITU-R BT.601 YCbCr, as MATLAB's ``rgb2ycbcr`` and BasicSR compute it.

    Args:
        img: RGB image ``[..., 3]`` (e.g. ``H x W x 3``): float in [0, 1], or uint8 in [0, 255]
            (divided by 255 first).

    Returns:
        float64 array ``img.shape[:-1]`` on the [0, 255] scale (16 for black, 235 for white),
        not rounded: ``16 + 65.481 R + 128.553 G + 24.966 B``.
    """
    a = np.asarray(img)
    if a.ndim < 1 or a.shape[-1] != 3:
        raise ValueError(f"rgb_to_y expects an RGB image [..., 3] (channels last), got shape {a.shape}")
    if a.dtype == np.uint8:
        a = a.astype(np.float64) / 255.0
    elif np.issubdtype(a.dtype, np.floating):
        a = a.astype(np.float64)
    else:
        raise ValueError(f"rgb_to_y expects float RGB in [0, 1] or uint8 RGB, got dtype {a.dtype}")
    r, g, b = _Y_WEIGHTS
    return _Y_OFFSET + r * a[..., 0] + g * a[..., 1] + b * a[..., 2]


# ---------------------------------------------------------------------------------------------
# PSNR / SSIM

def _as_uint8_range(img: Any, name: str) -> np.ndarray:
    """``img`` as a float64 ``H x W x C`` array of integers in [0, 255] (C = 1 or 3).

    uint8 arrays are taken as they are. Float arrays and torch tensors hold [0, 1] images and are
    quantised like BasicSR's ``tensor2img``: clamp to [0, 1], times 255, round (half to even).
    """
    if _is_torch_tensor(img):
        t = img.detach().cpu()
        if t.ndim == 4 and t.shape[0] == 1:
            t = t[0]
        if t.ndim != 3 or t.shape[0] not in (1, 3):
            raise ValueError(f"{name}: expected a [3, H, W] / [1, 3, H, W] (or 1-channel) tensor, got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{name}: expected a floating tensor in [0, 1], got {t.dtype}")
        a = t.double().permute(1, 2, 0).numpy()
    else:
        a = np.asarray(img)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[2] not in (1, 3):
        raise ValueError(f"{name}: expected an H x W x 3 (or H x W gray) image, got shape {a.shape}")
    if a.dtype == np.uint8:
        return a.astype(np.float64)
    if not np.issubdtype(a.dtype, np.floating):
        raise ValueError(f"{name}: expected uint8 in [0, 255] or float in [0, 1], got dtype {a.dtype}")
    a = a.astype(np.float64)
    if a.size and np.nanmax(a) > 2.0:
        raise ValueError(f"{name}: float images must be in [0, 1] (max is {np.nanmax(a):.4g}); "
                         f"pass [0, 255] data as uint8")
    return np.round(np.clip(a, 0.0, 1.0) * 255.0)


def _prepare(img: Any, ref: Any, crop_border: int, test_y_channel: bool, min_size: int = 1) -> Tuple[np.ndarray, np.ndarray]:
    a = _as_uint8_range(img, "img")
    b = _as_uint8_range(ref, "ref")
    if a.shape != b.shape:
        raise ValueError(f"img and ref differ in shape: {a.shape} vs {b.shape}")
    if isinstance(crop_border, bool) or not isinstance(crop_border, (int, np.integer)) or crop_border < 0:
        raise ValueError(f"crop_border must be an int >= 0, got {crop_border!r}")
    c = int(crop_border)
    H, W = a.shape[:2]
    if H - 2 * c < min_size or W - 2 * c < min_size:
        raise ValueError(f"a {H}x{W} image is too small for crop_border={c}"
                         + (f" and a {min_size}x{min_size} SSIM window" if min_size > 1 else ""))
    if c:
        a, b = a[c:H - c, c:W - c], b[c:H - c, c:W - c]
    if test_y_channel and a.shape[2] == 3:
        a, b = rgb_to_y(a / 255.0)[..., None], rgb_to_y(b / 255.0)[..., None]
    return a, b


def psnr(img: Any, ref: Any, crop_border: int, test_y_channel: bool = True) -> float:
    """Peak signal-to-noise ratio in dB, as BasicSR's ``calculate_psnr``.

    Args:
        img, ref: the two images, ``H x W x 3`` RGB (or ``H x W`` / ``H x W x 1`` gray): uint8 in
            [0, 255], or float arrays / ``[3, H, W]`` tensors in [0, 1] (clamped, times 255 and
            rounded to integers first, as the protocol does with model outputs).
        crop_border: pixels left out on every side (the scale factor in the SR protocol).
        test_y_channel: compare the BT.601 Y channel (:func:`rgb_to_y`, float, [0, 255] scale)
            instead of the RGB channels; gray images are compared as they are.

    Returns:
        ``10 log10(255^2 / MSE)`` in float64; ``inf`` for identical images.
    """
    a, b = _prepare(img, ref, crop_border, test_y_channel)
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(255.0 ** 2 / mse)


def _gaussian_window(size: int = _SSIM_WINDOW, sigma: float = _SSIM_SIGMA) -> np.ndarray:
    """1-D Gaussian ``exp(-k^2 / (2 sigma^2))`` on ``k = -(size-1)/2 .. (size-1)/2``, summing to 1."""
    k = np.arange(size, dtype=np.float64) - (size - 1) / 2
    g = np.exp(-(k ** 2) / (2 * sigma ** 2))
    return g / g.sum()


def _filter_valid(x: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Correlate ``x`` (H x W) with the separable window ``g g^T``, keeping only fully covered positions."""
    n = len(g)
    H, W = x.shape
    rows = sum(g[i] * x[i:H - n + 1 + i, :] for i in range(n))
    return sum(g[j] * rows[:, j:W - n + 1 + j] for j in range(n))


def _ssim_channel(x: np.ndarray, y: np.ndarray) -> float:
    g = _gaussian_window()
    mu_x, mu_y = _filter_valid(x, g), _filter_valid(y, g)
    var_x = _filter_valid(x * x, g) - mu_x ** 2
    var_y = _filter_valid(y * y, g) - mu_y ** 2
    cov = _filter_valid(x * y, g) - mu_x * mu_y
    num = (2 * mu_x * mu_y + _SSIM_C1) * (2 * cov + _SSIM_C2)
    den = (mu_x ** 2 + mu_y ** 2 + _SSIM_C1) * (var_x + var_y + _SSIM_C2)
    return float(np.mean(num / den))


def ssim(img: Any, ref: Any, crop_border: int, test_y_channel: bool = True) -> float:
    """Structural similarity, as BasicSR's ``calculate_ssim`` (and Wang et al.'s MATLAB ``ssim_index``).

    Args:
        img, ref: as for :func:`psnr` (uint8 in [0, 255], or [0, 1] floats quantised to integers).
        crop_border: pixels left out on every side before anything else.
        test_y_channel: SSIM of the BT.601 Y channel; otherwise the mean SSIM of the channels.

    Returns:
        The mean of the SSIM map in float64: 11x11 Gaussian window (sigma 1.5, sums to 1), only
        positions where the window lies inside the (cropped) image ("valid", 5 pixels lost on each
        side), ``C1 = (0.01*255)^2``, ``C2 = (0.03*255)^2``, population (not sample) variances.
        The cropped image must be at least 11x11.
    """
    a, b = _prepare(img, ref, crop_border, test_y_channel, min_size=_SSIM_WINDOW)
    return float(np.mean([_ssim_channel(a[..., c], b[..., c]) for c in range(a.shape[2])]))


# ---------------------------------------------------------------------------------------------
# MATLAB imresize(..., 'bicubic')

def _cubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel with a = -0.5 (MATLAB's 'bicubic'), support [-2, 2]."""
    ax = np.abs(x)
    ax2, ax3 = ax ** 2, ax ** 3
    near = 1.5 * ax3 - 2.5 * ax2 + 1.0               # |x| <= 1
    far = -0.5 * ax3 + 2.5 * ax2 - 4.0 * ax + 2.0    # 1 < |x| <= 2
    return np.where(ax <= 1, near, np.where(ax <= 2, far, 0.0))


def _output_length(length: int, scale: float) -> int:
    """``ceil(length * scale)`` (MATLAB's output size), not fooled by float error like 3 * (1/3)."""
    n = length * scale
    nearest = round(n)
    return int(nearest) if abs(n - nearest) < 1e-9 * max(1.0, n) else int(math.ceil(n))


def _axis_weights(in_len: int, out_len: int, scale: float, antialias: bool) -> Tuple[np.ndarray, np.ndarray]:
    """Weights ``[out_len, taps]`` and 0-based input indices ``[out_len, taps]`` of one resized axis.

    Output pixel ``x`` (1-based, MATLAB's convention) is centred at input coordinate
    ``u = x / scale + (1 - 1/scale) / 2``; it takes the input pixels within half the kernel width
    of ``u``. When shrinking with antialiasing the kernel is stretched by ``1/scale`` (width
    ``4/scale``, ``scale * cubic(scale * d)``). Each row is normalised to sum to 1. Indices outside
    the image are mirrored with the edge pixel repeated (``... 2 1 | 1 2 ... n | n n-1 ...``,
    MATLAB's 'symmetric' padding), periodically, so images smaller than the kernel also work.
    """
    shrink = antialias and scale < 1
    width = 4.0 / scale if shrink else 4.0
    x = np.arange(1, out_len + 1, dtype=np.float64)
    u = x / scale + 0.5 * (1.0 - 1.0 / scale)
    first = np.floor(u - width / 2)
    taps = int(math.ceil(width)) + 2
    idx = first[:, None] + np.arange(taps, dtype=np.float64)[None, :]    # 1-based input pixels
    dist = u[:, None] - idx
    weights = scale * _cubic(scale * dist) if shrink else _cubic(dist)
    weights = weights / weights.sum(axis=1, keepdims=True)
    period = 2 * in_len
    m = np.mod(idx - 1, period).astype(np.int64)                       # 0-based, one mirror period
    m = np.where(m < in_len, m, period - 1 - m)
    keep = np.any(weights != 0, axis=0)                                  # drop all-zero taps (MATLAB does too)
    return weights[:, keep], m[:, keep]


def imresize_bicubic(img: Any, scale: float, antialiasing: bool = True) -> Any:
    """Resize like MATLAB's ``imresize(img, scale, 'bicubic')`` (the SR benchmarks' LR inputs).

    Cubic convolution (a = -0.5, width 4); when shrinking (``scale < 1``) with ``antialiasing``
    the kernel is widened to ``4 / scale`` as MATLAB does; symmetric (edge-repeating) boundary;
    the output is ``ceil(H * scale) x ceil(W * scale)``; rows are resized first, then columns.
    Computed in float64, without clamping (bicubic overshoots slightly near edges).

    Args:
        img: ``H x W x C`` or ``H x W`` NumPy array: float (any range, typically [0, 1]) or uint8
            (then, as MATLAB does for uint8 images, the result is rounded half away from zero and
            clipped back to uint8). Torch tensors ``[C, H, W]`` / ``[B, C, H, W]`` (floating) are
            resized on their device and returned in their dtype; NumPy inputs never touch torch.
        scale: the same factor for both axes, e.g. ``1/4`` to make x4 LR inputs, ``4`` to upsample.
        antialiasing: widen the kernel when shrinking (MATLAB's default, True).

    Returns:
        The resized image, same kind and layout as ``img``: float64 for float arrays, uint8 for uint8.
    """
    if isinstance(scale, bool) or not isinstance(scale, (int, float, np.integer, np.floating)) \
            or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive number, got {scale!r}")
    scale = float(scale)
    if _is_torch_tensor(img):
        return _imresize_torch(img, scale, antialiasing)
    a = np.asarray(img)
    if a.ndim not in (2, 3) or a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"imresize_bicubic expects an H x W x C or H x W array, got shape {a.shape}")
    is_uint8 = a.dtype == np.uint8
    if not (is_uint8 or np.issubdtype(a.dtype, np.floating)):
        raise ValueError(f"imresize_bicubic expects a float or uint8 array, got dtype {a.dtype}")
    out = a.astype(np.float64)
    for axis in (0, 1):
        in_len = out.shape[axis]
        w, k = _axis_weights(in_len, _output_length(in_len, scale), scale, antialiasing)
        moved = np.moveaxis(out, axis, 0)
        acc = np.zeros((w.shape[0],) + moved.shape[1:], dtype=np.float64)
        bshape = (-1,) + (1,) * (moved.ndim - 1)
        for t in range(w.shape[1]):
            acc += w[:, t].reshape(bshape) * moved[k[:, t]]
        out = np.moveaxis(acc, 0, axis)
    if is_uint8:
        out = np.clip(np.floor(out + 0.5), 0, 255).astype(np.uint8)
    return out


def _imresize_torch(img: Any, scale: float, antialiasing: bool) -> Any:
    import torch

    if img.ndim not in (3, 4) or not img.is_floating_point():
        raise ValueError(f"imresize_bicubic expects a floating [C, H, W] or [B, C, H, W] tensor, "
                         f"got {img.dtype} {tuple(img.shape)}")
    out = img.to(torch.float64)
    for dim in (-2, -1):
        in_len = out.shape[dim]
        w, k = _axis_weights(in_len, _output_length(in_len, scale), scale, antialiasing)
        w_t = torch.from_numpy(w).to(out.device)
        k_t = torch.from_numpy(k).to(out.device)
        bshape = [1] * out.ndim
        bshape[dim] = -1
        acc = None
        for t in range(w.shape[1]):
            term = out.index_select(dim, k_t[:, t]) * w_t[:, t].view(bshape)
            acc = term if acc is None else acc + term
        out = acc
    return out.to(img.dtype)
