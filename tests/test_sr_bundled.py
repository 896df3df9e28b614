"""The SR weights visattn ships (visattn/weights/, trained by train/sr.py on scikit-image photos):
they load offline through timm, beat bicubic on every held-out photo, and are the CLI's default."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import visattn  # noqa: F401
from visattn import cli

ROOT = Path(__file__).resolve().parents[1]


def _train_module():
    spec = importlib.util.spec_from_file_location("visattn_train_sr", ROOT / "train" / "sr.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("scale", [2, 4])
def test_bundled_weights_beat_bicubic_on_every_held_out_photo(scale):
    """Recomputed here on CPU: better than bicubic on every held-out photo, and the scores the
    weights' JSON (and the README) report, to 0.01 dB (they were measured on the training device)."""
    train = _train_module()
    assert not set(train.HOLDOUT) & set(train.TRAIN)
    model = timm.create_model(f"visattn_pan_x{scale}.skimage", pretrained=True)
    assert model.upscale == scale
    reported = json.loads((ROOT / "visattn" / "weights" / f"pan_x{scale}_skimage.json").read_text())
    reported = {row["image"]: row for row in reported["holdout"]}
    pairs = {name: train.make_pair(train.load_photo(name), scale) for name in train.HOLDOUT}
    for row in train.evaluate(model, pairs, scale, torch.device("cpu")):
        assert row["psnr"] > row["bicubic_psnr"], row
        assert row["ssim"] > row["bicubic_ssim"], row
        assert abs(row["psnr"] - reported[row["image"]]["psnr"]) < 0.01, (row, reported[row["image"]])


def test_upscale_cli_defaults_to_the_bundled_model(tmp_path):
    from skimage.data import astronaut

    src = tmp_path / "crop.png"
    Image.fromarray(astronaut()[100:148, 200:264]).save(src)
    assert cli.main(["upscale", str(src), "-o", str(tmp_path / "out"), "--device", "cpu"]) == 0
    out = np.asarray(Image.open(tmp_path / "out" / "crop.png"))
    assert out.shape == (4 * 48, 4 * 64, 3)
