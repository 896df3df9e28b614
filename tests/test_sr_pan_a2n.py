"""PAN and A2N: official goldens and manifests through ``visattn.from_official``, wrapped and
mismatched checkpoints, the timm entry points (sizes, pretrained files), any input size, bad input."""
import pytest
import timm
import torch

import visattn
import visattn.models.a2n  # noqa: F401  (registers the visattn_a2n_* models and the AAN builder)
import visattn.models.pan  # noqa: F401  (registers the visattn_pan_* models and the PAN builder)
from golden_data import load_golden, load_manifest

SR_PARAMS = {
    "visattn_pan_x2": 261_403, "visattn_pan_x3": 261_403, "visattn_pan_x4": 272_419,
    "visattn_a2n_x2": 1_036_443, "visattn_a2n_x3": 1_036_443, "visattn_a2n_x4": 1_047_459,
}


def _run_golden(model, meta, io):
    """The contract: [0, 1] in and out; value_range 255 cases feed input / 255 and compare output * 255."""
    scale = meta["value_range"]
    with torch.no_grad():
        out = model(io["input"] / scale) * scale
    torch.testing.assert_close(out, io["output"], rtol=0, atol=meta["recommended_atol"])


@pytest.mark.parametrize("name", ["pan", "a2n"])
def test_golden(name):
    meta, sd, io = load_golden(name)
    model = visattn.from_official(meta, sd)
    assert not model.training and model.upscale == io["output"].shape[-1] // io["input"].shape[-1]
    _run_golden(model, meta, io)


@pytest.mark.parametrize("wrap", [
    lambda sd: {"params_ema": sd, "params": {}},
    lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
    lambda sd: {"model": sd},
])
@pytest.mark.parametrize("name", ["pan", "a2n"])
def test_wrapped_checkpoints(name, wrap):
    meta, sd, io = load_golden(name)
    _run_golden(visattn.from_official(meta, wrap(sd)), meta, io)


@pytest.mark.parametrize("name", ["PAN_x4", "A2N_x4"])
def test_manifest(name):
    """The full-size official state dict loads strictly and the parameter count is exact."""
    manifest = load_manifest(name)
    sd = {key: torch.zeros(shape) for key, shape in manifest["state_dict"]}
    model = visattn.from_official(manifest, sd)
    assert sum(p.numel() for p in model.parameters()) == manifest["num_params"]


@pytest.mark.parametrize("name", ["pan", "a2n"])
def test_visattn_keys_load_unchanged(name):
    meta, sd, io = load_golden(name)
    model = visattn.from_official(meta, sd)
    family = visattn.models.pan if name == "pan" else visattn.models.a2n
    own = model.state_dict()
    assert family.checkpoint_filter_fn(own, model).keys() == own.keys()
    _run_golden(visattn.from_official(meta, {"model": own}), meta, io)


def test_scale_mismatch_is_named():
    meta, sd, _ = load_golden("a2n")  # x2: no second upsampling stage
    x4 = {**meta, "constructor_kwargs": {"args_namespace": {"scale": [4]}}}
    with pytest.raises(visattn.CheckpointMismatchError, match=r"x2/x3 A2N checkpoint.*model is x4"):
        visattn.from_official(x4, sd)
    meta, sd, _ = load_golden("pan")  # x4
    x2 = {**meta, "constructor_kwargs": {**meta["constructor_kwargs"], "scale": 2}}
    with pytest.raises(visattn.CheckpointMismatchError, match=r"x4 PAN checkpoint.*model is x2"):
        visattn.from_official(x2, sd)


def test_other_family_and_wrong_size_are_named():
    pan_meta, pan_sd, _ = load_golden("pan")
    a2n_meta, a2n_sd, _ = load_golden("a2n")
    with pytest.raises(visattn.CheckpointMismatchError, match="looks like: A2N"):
        visattn.from_official(pan_meta, a2n_sd)
    with pytest.raises(visattn.CheckpointMismatchError, match="looks like: PAN"):
        visattn.from_official(a2n_meta, pan_sd)
    # Same family and scale, another width: nothing loads partially.
    model = timm.create_model("visattn_pan_x4", depth=2)
    with pytest.raises(visattn.CheckpointMismatchError, match="mis-shaped keys"):
        visattn.models.pan.checkpoint_filter_fn(pan_sd, model)


@pytest.mark.parametrize("name", sorted(SR_PARAMS))
def test_timm_entrypoints(name):
    with torch.device("meta"):
        model = timm.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == SR_PARAMS[name]
    assert model.upscale == int(name[-1])
    cfg = model.pretrained_cfg
    assert cfg["num_classes"] == 0 and cfg["mean"] == (0.0, 0.0, 0.0) and cfg["first_conv"] == "conv_first"
    release = f"PANx{name[-1]}_DF2K.pth" if "_pan_" in name else f"aan_x{name[-1]}.pt"
    if name == "visattn_a2n_x4":  # that release's blob is missing: no URL, the file is named in the notes
        assert cfg["url"] == "" and any(release in note for note in cfg["notes"])
    else:
        assert cfg["url"].endswith(release)


def test_timm_pretrained_from_official_file(tmp_path):
    """An official-format file (as released: plain state dict) loads through timm's pretrained path."""
    meta, sd, io = load_golden("pan")
    path = tmp_path / "PANx4_DF2K.pth"
    torch.save(sd, path)
    kw = meta["constructor_kwargs"]
    model = timm.create_model("visattn_pan_x4", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                              embed_dim=kw["nf"], upsample_dim=kw["unf"], depth=kw["nb"])
    _run_golden(model.eval(), meta, io)


@pytest.mark.parametrize("name", sorted(SR_PARAMS))
def test_any_input_size(name):
    model = timm.create_model(name, depth=1).eval()
    x = torch.rand(2, 3, 13, 17)
    with torch.no_grad():
        out = model(x)
    s = model.upscale
    assert out.shape == (2, 3, 13 * s, 17 * s) and out.dtype == x.dtype


def test_grad_checkpointing_same_gradients():
    model = timm.create_model("visattn_a2n_x2", depth=2)
    x = torch.rand(1, 3, 8, 8)
    grads = []
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        model.zero_grad()
        model(x).sum().backward()
        grads.append(model.conv_first.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("name", ["visattn_pan_x2", "visattn_a2n_x4"])
@pytest.mark.parametrize("x, match", [
    (torch.rand(3, 16, 16), r"expects an image batch \[B, 3, H, W\]"),
    (torch.rand(1, 1, 16, 16), r"expects 3 input channels"),
    (torch.randint(0, 255, (1, 3, 16, 16), dtype=torch.uint8), r"floating-point image batch in \[0, 1\]"),
])
def test_bad_input(name, x, match):
    model = timm.create_model(name, depth=1)
    with pytest.raises(ValueError, match=match):
        model(x)


def test_bad_config():
    with pytest.raises(ValueError, match="scale must be 2, 3 or 4"):
        visattn.models.pan.PAN(upscale=8)
    with pytest.raises(ValueError, match="without a classifier"):
        timm.create_model("visattn_a2n_x2", num_classes=10)
