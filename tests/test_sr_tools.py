"""SR user tools: PSNR/SSIM/Y and MATLAB bicubic (visattn.metrics), upscale() (visattn.sr), and the
``visattn upscale`` / ``visattn sr-eval`` commands, on a tiny conv SR model registered here."""
import math
import re
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from skimage import data as skdata
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from visattn import cli
from visattn.convert import unwrap_checkpoint
from visattn.metrics import imresize_bicubic, psnr, rgb_to_y, ssim
from visattn.models._sr_common import sr_cfg
from visattn.sr import _blend_ramp, upscale

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# a tiny fully convolutional SR model: conv3x3 - ReLU - conv3x3 - PixelShuffle (+ nearest skip).
# Each output pixel depends on the LR pixels within 2 of its own LR pixel.

class TinySR(nn.Module):
    def __init__(self, upscale: int = 2, width: int = 8, **kwargs):
        super().__init__()
        self.upscale = upscale
        self.conv_first = nn.Conv2d(3, width, 3, padding=1)
        self.conv_up = nn.Conv2d(width, 3 * upscale ** 2, 3, padding=1)
        self.shuffle = nn.PixelShuffle(upscale)

    def forward(self, x):
        skip = F.interpolate(x, scale_factor=self.upscale, mode="nearest")
        return skip + 0.3 * self.shuffle(self.conv_up(F.relu(self.conv_first(x))))


def _tiny_filter(state_dict, model):
    return unwrap_checkpoint(state_dict)


default_cfgs = generate_default_cfgs({"_sr_tools_tiny_x2": sr_cfg(scale=2, first_conv="conv_first")})


@register_model
def _sr_tools_tiny_x2(pretrained=False, **kwargs):
    return build_model_with_cfg(TinySR, "_sr_tools_tiny_x2", pretrained, pretrained_filter_fn=_tiny_filter,
                                upscale=2, **kwargs)


TINY = "_sr_tools_tiny_x2"


def _tiny(scale=2, seed=0):
    torch.manual_seed(seed)
    return TinySR(scale).eval()


def _photo(name, size=None):
    img = getattr(skdata, name)()
    if size is not None:
        h, w = size
        y0, x0 = (img.shape[0] - h) // 2, (img.shape[1] - w) // 2
        img = img[y0:y0 + h, x0:x0 + w]
    return np.ascontiguousarray(img)


# ---------------------------------------------------------------------------------------------
# rgb_to_y / psnr / ssim

def test_rgb_to_y_known_values():
    rgb = np.array([[0, 0, 0], [1, 1, 1], [1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=np.float64)
    np.testing.assert_allclose(rgb_to_y(rgb), [16, 235, 16 + 65.481, 16 + 128.553, 16 + 24.966], atol=1e-12)
    u8 = (rgb * 255).astype(np.uint8)
    np.testing.assert_allclose(rgb_to_y(u8), rgb_to_y(rgb), atol=1e-12)
    assert rgb_to_y(np.zeros((4, 5, 3))).shape == (4, 5)
    with pytest.raises(ValueError, match=r"\[\.\.\., 3\]"):
        rgb_to_y(np.zeros((3, 4, 5)))


def _degrade(hr, how, rng):
    if how == "bicubic":
        lr = imresize_bicubic(hr, 1 / 3)
        return imresize_bicubic(lr, 3)
    noisy = hr.astype(np.float64) + rng.normal(0, 8, hr.shape)
    return np.clip(np.round(noisy), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("name", ["astronaut", "coffee", "chelsea"])
@pytest.mark.parametrize("how", ["bicubic", "noise"])
def test_psnr_ssim_match_skimage(name, how):
    rng = np.random.default_rng(0)
    hr = _photo(name)
    hr = hr[: hr.shape[0] // 3 * 3, : hr.shape[1] // 3 * 3]
    img = _degrade(hr, how, rng)
    assert img.shape == hr.shape and img.dtype == np.uint8
    c = 3
    y_img, y_hr = rgb_to_y(img[c:-c, c:-c] / 255.0), rgb_to_y(hr[c:-c, c:-c] / 255.0)
    sk_psnr = peak_signal_noise_ratio(y_hr, y_img, data_range=255)
    sk_ssim = structural_similarity(y_hr, y_img, gaussian_weights=True, sigma=1.5,
                                    use_sample_covariance=False, data_range=255)
    # Same definitions (11x11 Gaussian sigma 1.5, valid region, population variances): equal up to float error.
    assert abs(psnr(img, hr, c) - sk_psnr) < 1e-9
    assert abs(ssim(img, hr, c) - sk_ssim) < 1e-9
    assert 15 < sk_psnr < 40 and 0.3 < sk_ssim < 0.99

    # RGB: PSNR over all channels, SSIM = mean of per-channel SSIM (skimage channel_axis does the same).
    a, b = img[c:-c, c:-c].astype(np.float64), hr[c:-c, c:-c].astype(np.float64)
    assert abs(psnr(img, hr, c, test_y_channel=False) - peak_signal_noise_ratio(b, a, data_range=255)) < 1e-9
    sk_rgb = structural_similarity(b, a, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                   data_range=255, channel_axis=-1)
    assert abs(ssim(img, hr, c, test_y_channel=False) - sk_rgb) < 1e-9


def test_metrics_quantise_float_and_tensor_inputs_like_tensor2img():
    hr = _photo("chelsea", (48, 64))
    rng = np.random.default_rng(1)
    out = np.clip(hr / 255.0 + rng.normal(0, 0.05, hr.shape), -0.1, 1.1)   # an unclamped SR output
    as_u8 = np.round(np.clip(out, 0, 1) * 255).astype(np.uint8)
    tensor = torch.from_numpy(out).permute(2, 0, 1).float()
    expected = psnr(as_u8, hr, 2)
    assert psnr(out, hr, 2) == pytest.approx(expected, abs=1e-12)
    assert psnr(tensor, hr, 2) == pytest.approx(expected, abs=1e-4)   # float32 tensor: rare rounding flips
    assert ssim(out, hr, 2) == pytest.approx(ssim(as_u8, hr, 2), abs=1e-12)
    assert psnr(hr, hr, 2) == math.inf and ssim(hr, hr, 2) == pytest.approx(1.0)
    gray = hr[..., 0]
    assert psnr(gray, gray[:, ::-1].copy(), 0) == psnr(gray[..., None], gray[:, ::-1, None].copy(), 0)


def test_metrics_reject_bad_inputs():
    a = np.zeros((20, 20, 3), np.uint8)
    with pytest.raises(ValueError, match="differ in shape"):
        psnr(a, np.zeros((20, 21, 3), np.uint8), 0)
    with pytest.raises(ValueError, match="too small for crop_border=5 and a 11x11 SSIM window"):
        ssim(a, a, 5)
    with pytest.raises(ValueError, match="crop_border"):
        psnr(a, a, -1)
    with pytest.raises(ValueError, match=r"in \[0, 1\].*uint8"):
        psnr(a.astype(np.float32) + 100, a, 0)
    with pytest.raises(ValueError, match="H x W x 3"):
        psnr(np.zeros((20, 20, 2), np.uint8), np.zeros((20, 20, 2), np.uint8), 0)


# ---------------------------------------------------------------------------------------------
# imresize_bicubic

def _keys(x):
    """Keys' cubic convolution kernel, a = -0.5 (MATLAB's 'bicubic')."""
    x = abs(x)
    if x <= 1:
        return 1.5 * x ** 3 - 2.5 * x ** 2 + 1
    if x <= 2:
        return -0.5 * x ** 3 + 2.5 * x ** 2 - 4 * x + 2
    return 0.0


def _reflect(j, n):
    """1-based pixel j of a length-n signal extended symmetrically (edge repeated), as a 0-based index."""
    while j < 1 or j > n:
        j = 1 - j if j < 1 else 2 * n + 1 - j
    return j - 1


def _reference_resize_1d(v, scale):
    """MATLAB imresize of a 1-D signal, straight from the definitions, one output pixel at a time."""
    n = len(v)
    out_n = math.ceil(n * Fraction(scale).limit_denominator(1000))
    k = min(scale, 1.0)  # shrinking: kernel stretched by 1/scale and scaled by scale (antialiasing)
    out = []
    for x in range(1, out_n + 1):
        u = x / scale + 0.5 * (1 - 1 / scale)  # input position of the output pixel's centre (1-based)
        js = range(math.floor(u - 2 / k) - 1, math.ceil(u + 2 / k) + 2)
        w = [k * _keys(k * (u - j)) for j in js]
        out.append(sum(wi * v[_reflect(j, n)] for wi, j in zip(w, js)) / sum(w))
    return np.array(out)


def _reference_resize_2d(img, scale):
    rows = np.stack([_reference_resize_1d(img[:, j], scale) for j in range(img.shape[1])], axis=1)
    return np.stack([_reference_resize_1d(rows[i], scale) for i in range(rows.shape[0])], axis=0)


def test_imresize_hand_computed_ramp():
    # Downscale [0, 1, 2, 3] by 1/2: kernel width 8, weights 0.5 * cubic(0.5 * d). Output 1 sits at
    # u = 1.5; the taps j = -2..5 are at 0.5*d = 1.75, 1.25, 0.75, 0.25, -0.25, ... with
    # cubic = -0.0234375, -0.0703125, 0.2265625, 0.8671875 (symmetric), and the symmetric extension
    # gives values [2, 1, 0, 0, 1, 2, 3, 3]:
    # 0.5 * (-0.0234375*2 - 0.0703125*1 + 0.8671875*1 + 0.2265625*2 - 0.0703125*3 - 0.0234375*3) = 0.4609375.
    assert _keys(0.25) == 0.8671875 and _keys(0.75) == 0.2265625
    assert _keys(1.25) == -0.0703125 and _keys(1.75) == -0.0234375
    down = [0.4609375, 3 - 0.4609375]
    # Upscale by 2: u = x/2 + 0.25; output 1 (u = 0.75): taps j = -1..2 with cubic(d) = -0.0234375,
    # 0.2265625, 0.8671875, -0.0703125 on values [1, 0, 0, 1] -> -0.09375; output 2 (u = 1.25):
    # -0.0703125*0 + 0.8671875*0 + 0.2265625*1 - 0.0234375*2 = 0.1796875; output 3 -> 0.7265625;
    # output 4 (u = 2.25, interior, cubic reproduces the ramp): 1.25. The rest by symmetry.
    up = [-0.09375, 0.1796875, 0.7265625, 1.25, 1.75, 2.2734375, 2.8203125, 3.09375]
    np.testing.assert_allclose(_reference_resize_1d([0, 1, 2, 3], 0.5), down, atol=1e-15)
    np.testing.assert_allclose(_reference_resize_1d([0, 1, 2, 3], 2), up, atol=1e-15)

    ramp = np.add.outer(np.arange(4.0), 4 * np.arange(4.0))  # r[i, j] = i + 4 j; resizing is separable
    np.testing.assert_allclose(imresize_bicubic(ramp, 0.5), np.add.outer(down, 4 * np.array(down)), atol=1e-12)
    np.testing.assert_allclose(imresize_bicubic(ramp, 2), np.add.outer(up, 4 * np.array(up)), atol=1e-12)
    rgb = np.stack([ramp, 2 * ramp, ramp[::-1]], axis=-1)
    out = imresize_bicubic(rgb, 2)
    assert out.shape == (8, 8, 3) and out.dtype == np.float64
    np.testing.assert_allclose(out[..., 1], 2 * out[..., 0], atol=1e-12)


@pytest.mark.parametrize("scale", [1 / 2, 1 / 3, 1 / 4, 0.7, 1.6, 2, 3])
def test_imresize_matches_reference_from_definitions(scale):
    img = np.random.default_rng(0).random((7, 9))
    np.testing.assert_allclose(imresize_bicubic(img, scale), _reference_resize_2d(img, scale), atol=1e-12)


def test_imresize_shapes_uint8_and_torch():
    assert imresize_bicubic(np.zeros((10, 7, 3)), 0.5).shape == (5, 4, 3)
    assert imresize_bicubic(np.zeros((10, 7, 3)), 1 / 3).shape == (4, 3, 3)
    assert imresize_bicubic(np.zeros((9, 6)), 1 / 3).shape == (3, 2)  # 9 * (1/3) is not "3.0000001"
    assert imresize_bicubic(np.zeros((255, 300, 3)), 1 / 3).shape == (85, 100, 3)
    assert imresize_bicubic(np.zeros((10, 7)), 1.5).shape == (15, 11)
    assert imresize_bicubic(np.zeros((2, 1)), 4).shape == (8, 4)  # smaller than the kernel
    hr = _photo("astronaut", (64, 48))
    lr = imresize_bicubic(hr, 1 / 4)
    exact = imresize_bicubic(hr / 255.0, 1 / 4) * 255
    assert lr.dtype == np.uint8 and lr.shape == (16, 12, 3)
    np.testing.assert_array_equal(lr, np.clip(np.floor(exact + 0.5), 0, 255))  # MATLAB's uint8 rounding
    t = torch.from_numpy(hr / 255.0).permute(2, 0, 1)
    np.testing.assert_allclose(imresize_bicubic(t[None], 1 / 4)[0].permute(1, 2, 0).numpy(), exact / 255, atol=1e-12)
    assert imresize_bicubic(t.float(), 2).dtype == torch.float32
    for bad in (0, -1, float("nan"), True):
        with pytest.raises(ValueError, match="positive"):
            imresize_bicubic(hr, bad)
    with pytest.raises(ValueError, match="float or uint8"):
        imresize_bicubic(hr.astype(np.int32), 0.5)


def test_imresize_down_up_of_a_smooth_image_stays_close():
    y, x = np.mgrid[0:96, 0:80] / 96.0
    smooth = np.stack([0.5 + 0.4 * np.sin(2 * np.pi * (x + y)), 0.5 + 0.3 * np.cos(3 * x), x * y], axis=-1)
    back = imresize_bicubic(imresize_bicubic(smooth, 0.5), 2)
    assert back.shape == smooth.shape
    assert np.abs(back - smooth)[4:-4, 4:-4].max() < 0.01
    assert psnr(back, smooth, 4) > 45


def test_imresize_numpy_path_needs_no_torch():
    code = (
        "import importlib.util, sys\n"
        "sys.modules['torch'] = None\n"  # any `import torch` now fails
        f"spec = importlib.util.spec_from_file_location('m', {str(REPO / 'visattn' / 'metrics.py')!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "import numpy as np\n"
        "a = np.random.default_rng(0).random((16, 14, 3))\n"
        "b = m.imresize_bicubic(m.imresize_bicubic(a, 0.5), 2)\n"
        "print(b.shape, round(m.psnr(b, a, 2), 1) > 0, m.ssim(b, a, 0) < 1)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(16, 14, 3) True True"


# ---------------------------------------------------------------------------------------------
# upscale()

def test_upscale_round_trips_every_input_kind():
    model = _tiny()
    rgb = _photo("chelsea", (20, 28))
    out = upscale(rgb, model)
    assert out.dtype == np.uint8 and out.shape == (40, 56, 3)

    pil = upscale(Image.fromarray(rgb), model)
    assert isinstance(pil, Image.Image) and pil.mode == "RGB" and pil.size == (56, 40)
    np.testing.assert_array_equal(np.asarray(pil), out)

    t = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255
    t_out = upscale(t, model)
    assert t_out.shape == (3, 40, 56) and t_out.dtype == torch.float32
    assert 0 <= t_out.min() and t_out.max() <= 1
    with torch.no_grad():
        expected = model(t[None]).clamp(0, 1)[0]
    torch.testing.assert_close(t_out, expected)
    np.testing.assert_array_equal((t_out * 255).round().byte().permute(1, 2, 0).numpy(), out)

    batch = torch.rand(2, 3, 9, 11)
    assert upscale(batch, model).shape == (2, 3, 18, 22)
    half = upscale(batch.half(), model)
    assert half.dtype == torch.float16 and half.shape == (2, 3, 18, 22)


def test_upscale_gray_is_replicated_then_returned_as_luma():
    model = _tiny()
    gray = _photo("coffee", (16, 24))[..., 1]
    out = upscale(gray, model)
    assert out.shape == (32, 48) and out.dtype == np.uint8
    rgb_out = upscale(np.repeat(gray[..., None], 3, axis=-1), model).astype(np.float64) / 255
    luma = np.tensordot(rgb_out, [0.299, 0.587, 0.114], axes=([-1], [0]))
    assert np.abs(out - luma * 255).max() <= 1.0  # luma of the (rounded) RGB result, up to rounding
    assert upscale(gray[..., None], model).shape == (32, 48, 1)
    np.testing.assert_array_equal(upscale(gray[..., None], model)[..., 0], out)
    pil = upscale(Image.fromarray(gray), model)
    assert pil.mode == "L" and pil.size == (48, 32)
    np.testing.assert_array_equal(np.asarray(pil), out)


def test_upscale_rgba_runs_rgb_through_the_model_and_alpha_bicubic():
    model = _tiny()
    rgb = _photo("astronaut", (16, 16))
    alpha = np.full((16, 16, 1), 200, np.uint8)
    alpha[:, :8] = 0
    rgba = np.concatenate([rgb, alpha], axis=-1)
    out = upscale(rgba, model)
    assert out.shape == (32, 32, 4) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[..., :3], upscale(rgb, model))
    assert (out[:, :12, 3] == 0).all() and (out[:, 20:, 3] == 200).all()
    pil = upscale(Image.fromarray(rgba), model)
    assert pil.mode == "RGBA" and pil.size == (32, 32)


@pytest.mark.parametrize("tile, overlap", [(24, 8), (25, 12), (20, 9), (40, 16)])
def test_tiled_equals_untiled_for_a_fully_conv_model(tile, overlap):
    # The model looks 2 LR pixels around each output; tiles give zero weight to the outer quarter
    # (>= 2 px here) of each overlap, so every blended pixel comes from an exact tile output.
    model = _tiny(seed=3)
    x = torch.rand(2, 3, 45, 71)
    whole = upscale(x, model)
    tiled = upscale(x, model, tile=tile, tile_overlap=overlap, progress=False)
    torch.testing.assert_close(tiled, whole, atol=1e-5, rtol=0)


def test_tiling_is_exact_only_beyond_the_receptive_field_and_blends_linearly():
    model = _tiny(seed=3)
    x = torch.rand(1, 3, 40, 40)
    whole = upscale(x, model)
    # overlap 4: zero-weight margin of 1 px < the model's reach of 2 px -> the tile edges show.
    assert (upscale(x, model, tile=16, tile_overlap=4, progress=False) - whole).abs().max() > 1e-3
    # A tile bigger than the image is the untiled run.
    torch.testing.assert_close(upscale(x, model, tile=64, tile_overlap=8, progress=False), whole, atol=0, rtol=0)
    # Two neighbours overlapping by exactly `overlap` cross-fade: weights sum to 1, linear in the middle half.
    s, n, ov = 2, 24, 8
    lead, trail = _blend_ramp(n, s, ov, lead=True, trail=False), _blend_ramp(n, s, ov, lead=False, trail=True)
    torch.testing.assert_close(trail[-s * ov:] + lead[: s * ov], torch.ones(s * ov, dtype=torch.float64))
    assert (lead[: s * ov // 4] == 0).all() and (lead[3 * s * ov // 4:] == 1).all()
    assert torch.allclose(lead[5:11].diff(), torch.full((5,), 1 / (s * ov / 2), dtype=torch.float64))


def test_upscale_progress_bar_can_be_disabled(capsys):
    model = _tiny()
    x = torch.rand(1, 3, 30, 30)
    upscale(x, model, tile=16, tile_overlap=4, progress=False)
    assert capsys.readouterr().err == ""
    upscale(x, model, tile=16, tile_overlap=4, progress=True)
    assert "upscale" in capsys.readouterr().err


def test_upscale_dtype_model_state_and_scale_inference():
    model = _tiny().train()
    x = torch.rand(1, 3, 12, 12)
    full = upscale(x, model)
    assert model.training  # train/eval mode restored
    low = upscale(x, model, dtype=torch.bfloat16)  # CPU: a bfloat16 copy of the model runs
    assert low.dtype == torch.float32 and next(model.parameters()).dtype == torch.float32
    assert (low - full).abs().max() < 0.05
    # No `upscale` attribute: the scale is read off the output.
    plain = nn.Sequential(nn.Conv2d(3, 27, 3, padding=1), nn.PixelShuffle(3))
    assert upscale(x, plain).shape == (1, 3, 36, 36)
    assert upscale(x, plain, tile=8, tile_overlap=2, progress=False).shape == (1, 3, 36, 36)


@pytest.mark.parametrize("image, message", [
    (np.zeros((8, 8, 3), np.float32), "uint8 numpy array"),
    (np.zeros((8, 8, 3), np.uint16), "uint8 numpy array"),
    (np.zeros((8, 8, 2), np.uint8), r"H x W x 3 \(RGB\)"),
    (np.zeros((1, 8, 8, 3), np.uint8), r"H x W x 3 \(RGB\)"),
    (np.zeros((0, 8, 3), np.uint8), "empty"),
    (Image.new("CMYK", (8, 8)), "mode 'RGB', 'L' or 'RGBA', got mode 'CMYK'"),
    (Image.new("P", (8, 8)), "got mode 'P'"),
    (torch.zeros(3, 8, 8, dtype=torch.uint8), r"float tensor in \[0, 1\], got torch.uint8"),
    (torch.zeros(4, 8, 8), r"\[3, H, W\] or \[B, 3, H, W\]"),
    (torch.zeros(8, 8), r"\[3, H, W\] or \[B, 3, H, W\]"),
    ([[0, 1], [2, 3]], "uint8 H x W x 3 numpy array.*PIL image.*float tensor"),
])
def test_upscale_rejects_unsupported_images(image, message):
    with pytest.raises(ValueError, match=message):
        upscale(image, _tiny())


def test_upscale_rejects_bad_arguments_and_outputs():
    model, x = _tiny(), torch.rand(1, 3, 8, 8)
    with pytest.raises(ValueError, match=r"tile \(64\) must be larger than 2 \* tile_overlap \(64\)"):
        upscale(x, model, tile=64)
    for tile in (0, -4, 2.5, True):
        with pytest.raises(ValueError, match="tile must be None"):
            upscale(x, model, tile=tile, tile_overlap=0)
    with pytest.raises(ValueError, match="tile_overlap must be an int >= 0"):
        upscale(x, model, tile=16, tile_overlap=-1)
    with pytest.raises(ValueError, match="dtype must be"):
        upscale(x, model, dtype=torch.int8)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        upscale(x, lambda t: t)
    with pytest.raises(ValueError, match=r"must return \[1, 3, s\*8, s\*8\]"):
        upscale(x, nn.Conv2d(3, 4, 1))
    wrong = nn.Sequential(nn.Conv2d(3, 12, 3, padding=1), nn.PixelShuffle(2))
    wrong.upscale = 3  # claims x3, returns x2
    with pytest.raises(ValueError, match=r"must return \[1, 3, 3\*8, 3\*8\]"):
        upscale(x, wrong)


# ---------------------------------------------------------------------------------------------
# CLI

def _save(path, array):
    Image.fromarray(array).save(path)
    return str(path)


def test_cli_upscale_writes_pngs_of_the_right_size(tmp_path, capsys):
    a = _save(tmp_path / "astro.png", _photo("astronaut", (40, 36)))
    b = _save(tmp_path / "cat.jpg", _photo("chelsea", (30, 44)))
    g = _save(tmp_path / "gray.png", _photo("camera", (20, 24)))
    out = tmp_path / "out"
    assert cli.main(["upscale", a, b, g, "-o", str(out), "--model", TINY, "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "random weights" in captured.err
    sizes = {p.name: Image.open(p).size for p in out.iterdir()}
    assert sizes == {"astro.png": (72, 80), "cat.png": (88, 60), "gray.png": (48, 40)}
    assert Image.open(out / "gray.png").mode == "L"
    assert re.search(r"cat\.png\s+44x30 -> 88x60", captured.out)

    # Tiled, with weights: a BasicSR-style {'params_ema': ...} checkpoint through the model's filter.
    model = _tiny(seed=5)
    ckpt = tmp_path / "tiny.pth"
    torch.save({"params_ema": model.state_dict(), "params": {}}, ckpt)
    out2 = tmp_path / "out2"
    assert cli.main(["upscale", a, "-o", str(out2), "--model", TINY, "--weights", str(ckpt),
                     "--tile", "16", "--tile-overlap", "4", "--device", "cpu"]) == 0
    expected = upscale(np.asarray(Image.open(a)), model, tile=16, tile_overlap=4, progress=False)
    np.testing.assert_array_equal(np.asarray(Image.open(out2 / "astro.png")), expected)


def test_cli_sr_eval_prints_rows_mean_and_saves_comparison(tmp_path, capsys):
    hr_dir = tmp_path / "hr"
    hr_dir.mkdir()
    _save(hr_dir / "a_astro.png", _photo("astronaut", (49, 61)))  # odd: mod-cropped to 48x60
    _save(hr_dir / "b_coffee.png", _photo("coffee", (40, 52)))
    (hr_dir / "notes.txt").write_text("not an image")
    cmp_png = tmp_path / "cmp" / "comparison.png"
    assert cli.main(["sr-eval", "--model", TINY, "--hr-dir", str(hr_dir), "--scale", "2", "--device", "cpu",
                     "--save-comparison", str(cmp_png)]) == 0
    out = capsys.readouterr().out
    assert "crop_border=2" in out
    rows = {m.group(1): [float(v) for v in m.groups()[2:]]
            for m in re.finditer(r"^(\S+)\s+(\d+x\d+)?\s*([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$", out, re.M)}
    assert set(rows) == {"a_astro.png", "b_coffee.png", "mean"}
    assert re.search(r"^a_astro\.png\s+60x48\s", out, re.M)
    np.testing.assert_allclose(rows["mean"], np.mean([rows["a_astro.png"], rows["b_coffee.png"]], axis=0),
                               atol=1e-4)
    # The bicubic baseline follows the protocol: MATLAB bicubic down, then up, on the mod-cropped HR.
    hr = _photo("astronaut", (49, 61))[:48, :60]
    bicubic = imresize_bicubic(imresize_bicubic(hr, 1 / 2), 2)
    assert rows["a_astro.png"][2] == pytest.approx(psnr(bicubic, hr, 2), abs=1e-4)
    assert rows["a_astro.png"][3] == pytest.approx(ssim(bicubic, hr, 2), abs=1e-4)
    with Image.open(cmp_png) as im:
        assert im.format == "PNG" and im.size[0] > 300


@pytest.mark.parametrize("content", [b"not an image at all", "truncated"])
def test_cli_corrupt_image_exits_2_with_one_line(tmp_path, capsys, content):
    bad = tmp_path / "bad.png"
    if content == "truncated":
        good = tmp_path / "good.png"
        _save(good, _photo("astronaut", (64, 64)))
        content = good.read_bytes()[:300]
    bad.write_bytes(content)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["upscale", str(bad), "-o", str(tmp_path / "out"), "--model", TINY, "--device", "cpu"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"visattn: error: cannot read image {bad}")
    assert len([line for line in err if line.startswith("visattn: error")]) == 1


@pytest.mark.parametrize("argv, message", [
    (["upscale", "IMG", "-o", "OUT", "--model", "_sr_tools_tiny_x22"], "no model named '_sr_tools_tiny_x22'"),
    (["upscale", "IMG", "-o", "OUT", "--model", "visattn_nat_t"], "not a super-resolution model"),
    (["upscale", "IMG", "-o", "OUT", "--model", TINY, "--weights", "missing.pth"], "--weights missing.pth: no such file"),
    (["upscale", "IMG", "-o", "OUT", "--model", TINY, "--weights", "GARBAGE"], "cannot load --weights"),
    (["upscale", "IMG", "-o", "OUT", "--model", TINY, "--tile", "64"], "must be larger than 2 \\* --tile-overlap"),
    (["upscale", "IMG", "IMG", "-o", "OUT", "--model", TINY], "would both be written"),
    (["upscale", "IMG16", "-o", "OUT", "--model", TINY], "mode 'I;16'"),
    (["sr-eval", "--model", TINY, "--hr-dir", "HR", "--scale", "3"], "does not match _sr_tools_tiny_x2, an x2 model"),
    (["sr-eval", "--model", TINY, "--hr-dir", "OUT"], "no images"),
])
def test_cli_sr_errors_exit_2(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    _save(tmp_path / "IMG.png", _photo("coffee", (16, 16)))
    Image.fromarray(np.full((8, 8), 1000, np.uint16)).save(tmp_path / "IMG16.png")
    (tmp_path / "GARBAGE").write_bytes(b"\x00garbage")
    (tmp_path / "HR").mkdir()
    _save(tmp_path / "HR" / "x.png", _photo("coffee", (24, 24)))
    (tmp_path / "OUT").mkdir()
    argv = [{"IMG": "IMG.png", "IMG16": "IMG16.png"}.get(a, a) for a in argv]
    argv += ["--device", "cpu"] if "--device" not in argv else []
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_tiny_model_is_registered_outside_the_visattn_namespace():
    assert timm.is_model(TINY) and TINY not in cli.profile.list_visattn_models()
    assert timm.create_model(TINY).upscale == 2
