"""RCAN and HAN: official goldens ([0, 255] convention) and manifests through ``visattn.from_official``,
released checkpoint wrappers, scale / family mismatches, mean-shift values read from the checkpoint,
the timm entry points, any input size and bad input."""
import pytest
import timm
import torch

import visattn
import visattn.models.han  # noqa: F401  (registers the HAN models and official class)
import visattn.models.rcan  # noqa: F401  (registers the RCAN models and official class)
from visattn.models.han import HAN
from visattn.models.rcan import DF2K_RGB_MEAN, RCAN
from golden_data import load_golden, load_manifest, manifest_names

RCAN_MANIFESTS = manifest_names("yulunzhang/RCAN")
HAN_MANIFESTS = manifest_names("wwlCape/HAN")
# Small configs for the tests that only need the structure.
TINY = dict(num_groups=1, num_blocks=1, num_feats=8, reduction=4)


def _sr(model, x01):
    """Run ``model`` on ``[0, 1]`` input without gradients."""
    with torch.no_grad():
        return model(x01)


def _assert_golden(model, meta, io):
    """The contract for ``value_range`` 255: feed input / 255, compare output * 255."""
    assert meta["value_range"] == 255
    out = _sr(model, io["input"] / 255) * 255
    torch.testing.assert_close(out, io["output"], rtol=0, atol=meta["recommended_atol"])


def _with_args(meta, **changes):
    """``meta`` with some fields of its official ``args_namespace`` changed."""
    ns = meta["constructor_kwargs"]["args_namespace"]
    return {**meta, "constructor_kwargs": {"args_namespace": {**ns, **changes}}}


def _manifest_state_dict(name, fill=torch.randn):
    manifest = load_manifest(name)
    return manifest, {key: fill(shape) for key, shape in manifest["state_dict"]}


@pytest.mark.parametrize("name, cls", [("rcan", RCAN), ("han", HAN)])
def test_golden(name, cls):
    """The official outputs are reproduced at the golden's recommended tolerance."""
    meta, sd, io = load_golden(name)
    model = visattn.from_official(meta, sd)
    assert type(model) is cls and not model.training and model.upscale == 4
    _assert_golden(model, meta, io)


@pytest.mark.parametrize("wrap", [
    lambda sd: {"params": sd},
    lambda sd: {"state_dict": sd},
    lambda sd: {"params_ema": sd, "params": {}},
    lambda sd: {f"module.{k}": v for k, v in sd.items()},
], ids=["params", "state_dict", "params_ema", "module_prefix"])
@pytest.mark.parametrize("name", ["rcan", "han"])
def test_wrapped_checkpoints(name, wrap):
    meta, sd, io = load_golden(name)
    _assert_golden(visattn.from_official(meta, wrap(sd)), meta, io)


@pytest.mark.parametrize("name", ["rcan", "han"])
def test_visattn_state_dict_loads_unchanged(name):
    meta, sd, io = load_golden(name)
    own = visattn.from_official(meta, sd).state_dict()
    model = visattn.from_official(meta, own)
    assert model.state_dict().keys() == own.keys()
    _assert_golden(model, meta, io)


@pytest.mark.parametrize("name", RCAN_MANIFESTS + HAN_MANIFESTS)
def test_manifest(name):
    """Every full-size official state dict loads strictly and the parameter count is exact. (Not run:
    random full-size weights overflow to inf / NaN, which is slow on CPU; tiny models cover forward.)"""
    manifest, sd = _manifest_state_dict(name)
    model = visattn.from_official(manifest, sd)
    assert sum(p.numel() for p in model.parameters()) == manifest["num_params"]
    assert model.upscale == manifest["constructor_kwargs"]["args_namespace"]["scale"][0]
    torch.testing.assert_close(model.sub_mean.bias, sd["sub_mean.bias"], rtol=0, atol=0)


def test_manifests_cover_the_released_variants():
    assert {"RCAN_BIX2", "RCAN_BIX3", "RCAN_BIX4", "RCAN_BIX8"} <= set(RCAN_MANIFESTS)
    assert "HAN_BIX4" in HAN_MANIFESTS


def test_other_scale_checkpoint_is_refused():
    """An x2 release into an x4 model is named as such; nothing loads partially."""
    manifest_x4 = load_manifest("RCAN_BIX4")
    _, sd_x2 = _manifest_state_dict("RCAN_BIX2", fill=torch.zeros)
    with pytest.raises(visattn.CheckpointMismatchError, match=r"x2 RCAN checkpoint but the model upscales x4"):
        visattn.from_official(manifest_x4, sd_x2)


@pytest.mark.parametrize("ckpt_scale, model_scale", [(4, 3), (4, 8), (3, 2), (8, 4), (2, 3)])
def test_other_scale_reduced(ckpt_scale, model_scale):
    """Official (the x4 golden) and visattn-keyed checkpoints of another scale are refused by name."""
    meta, sd, _ = load_golden("rcan")
    if ckpt_scale != 4:
        sd = RCAN(ckpt_scale, num_groups=2, num_blocks=2, num_feats=8, reduction=4).state_dict()
    with pytest.raises(visattn.CheckpointMismatchError, match=rf"x{ckpt_scale} RCAN checkpoint .* x{model_scale}"):
        visattn.from_official(_with_args(meta, scale=[model_scale]), sd)


def test_other_family_checkpoint_is_named():
    rcan_meta, rcan_sd, _ = load_golden("rcan")
    han_meta, han_sd, _ = load_golden("han")
    with pytest.raises(visattn.CheckpointMismatchError, match="this is a HAN checkpoint but the model is RCAN"):
        visattn.from_official(rcan_meta, han_sd)
    with pytest.raises(visattn.CheckpointMismatchError, match="this is a RCAN checkpoint but the model is HAN"):
        visattn.from_official(han_meta, rcan_sd)
    _, nat_sd, _ = load_golden("nat")
    with pytest.raises(visattn.CheckpointMismatchError, match="looks like: NAT"):
        visattn.from_official(rcan_meta, {"model": nat_sd})
    basicsr = {"conv_first.weight": torch.zeros(8, 3, 3, 3),
               "body.0.residual_group.0.rcab.0.weight": torch.zeros(8, 8, 3, 3)}
    with pytest.raises(visattn.CheckpointMismatchError, match="BasicSR-layout"):
        visattn.from_official(rcan_meta, basicsr)


def test_structure_mismatch_lists_keys():
    """A checkpoint with another block count fails strictly, naming the keys."""
    meta, sd, _ = load_golden("rcan")
    with pytest.raises(visattn.CheckpointMismatchError, match=r"missing keys .*body\.0\.blocks\.2\.conv1\.weight"):
        visattn.from_official(_with_args(meta, n_resblocks=3), sd)


@pytest.mark.parametrize("name", ["rcan", "han"])
def test_drifted_mean_shift_is_used(name):
    """sub_mean / add_mean come from the checkpoint: a shifted add_mean bias shifts the output by
    exactly that much, and a shifted sub_mean bias equals shifting the input."""
    meta, sd, io = load_golden(name)
    reference = visattn.from_official(meta, sd)
    delta = torch.tensor([1.5, -2.0, 3.0])
    drifted = dict(sd, **{"add_mean.bias": sd["add_mean.bias"] + delta, "sub_mean.bias": sd["sub_mean.bias"] + delta})
    model = visattn.from_official(meta, drifted)
    x = io["input"] / 255
    out = _sr(model, x) * 255
    expected = _sr(reference, x + delta.view(1, 3, 1, 1) / 255) * 255 + delta.view(1, 3, 1, 1)
    torch.testing.assert_close(out, expected, rtol=0, atol=meta["recommended_atol"])
    assert (out - io["output"]).abs().max() > 1.0


@pytest.mark.parametrize("name, params", [
    ("visattn_rcan_x2", 15_444_667), ("visattn_rcan_x3", 15_629_307), ("visattn_rcan_x4", 15_592_379),
    ("visattn_rcan_x8", 15_740_091), ("visattn_han_x2", 15_924_057), ("visattn_han_x3", 16_108_697),
    ("visattn_han_x4", 16_071_769), ("visattn_han_x8", 16_219_481),
])
def test_timm_entrypoints_match_official_sizes(name, params):
    with torch.device("meta"):
        model = timm.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == params
    assert model.upscale == int(name[-1]) and model.num_classes == 0
    assert model.pretrained_cfg["classifier"] is None and model.pretrained_cfg["mean"] == (0.0, 0.0, 0.0)


@pytest.mark.parametrize("arch, name", [("visattn_rcan_x4", "rcan"), ("visattn_han_x4", "han")])
def test_timm_pretrained_from_local_official_file(arch, name, tmp_path):
    """An official-format file goes through the pretrained filter and reproduces the golden."""
    meta, sd, io = load_golden(name)
    path = tmp_path / "official.pt"
    torch.save(sd, path)
    ns = meta["constructor_kwargs"]["args_namespace"]
    model = timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                              num_groups=ns["n_resgroups"], num_blocks=ns["n_resblocks"], num_feats=ns["n_feats"],
                              reduction=ns["reduction"]).eval()
    _assert_golden(model, meta, io)


@pytest.mark.parametrize("arch", ["visattn_rcan_x2", "visattn_rcan_x3", "visattn_rcan_x4", "visattn_rcan_x8",
                                  "visattn_han_x2", "visattn_han_x3", "visattn_han_x4", "visattn_han_x8"])
def test_odd_input_sizes(arch):
    model = timm.create_model(arch, **TINY).eval()
    s = model.upscale
    assert _sr(model, torch.rand(2, 3, 13, 17)).shape == (2, 3, 13 * s, 17 * s)


@pytest.mark.parametrize("x, match", [
    (torch.rand(3, 16, 16), r"expects an image batch \[B, 3, H, W\]"),
    (torch.rand(1, 1, 16, 16), r"expects 3 input channels"),
    (torch.randint(0, 255, (1, 3, 16, 16), dtype=torch.uint8),
     r"floating-point image batch in \[0, 1\].*x\.float\(\) / 255"),
], ids=["rank", "channels", "uint8"])
@pytest.mark.parametrize("arch", ["visattn_rcan_x4", "visattn_han_x4"])
def test_bad_input(arch, x, match):
    model = timm.create_model(arch, **TINY)
    with pytest.raises(ValueError, match=match):
        model(x)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="in_chans must be 3"):
        timm.create_model("visattn_rcan_x4", in_chans=1, **TINY)
    with pytest.raises(ValueError, match="without a classifier"):
        timm.create_model("visattn_han_x4", num_classes=10, **TINY)
    meta, sd, _ = load_golden("han")
    with pytest.raises(ValueError, match=r"n_resgroups=10 \(its last_conv hard-codes n_feats\*11"):
        visattn.from_official(_with_args(meta, n_resgroups=4), sd)
    meta, sd, _ = load_golden("rcan")
    with pytest.raises(ValueError, match="data_train='Set5'"):
        visattn.from_official(_with_args(meta, data_train="Set5"), sd)
    with pytest.raises(ValueError, match="n_colors 3"):
        visattn.from_official(_with_args(meta, n_colors=1), sd)


def test_df2k_mean_for_divflickr2k():
    """The official RCAN picks its mean-shift init from data_train (the checkpoint values win on load)."""
    meta, _, _ = load_golden("rcan")
    model = visattn.models.rcan._official_rcan(_with_args(meta, data_train="DIVFlickr2K"))
    torch.testing.assert_close(model.add_mean.bias, 255 * torch.tensor(DF2K_RGB_MEAN))
    torch.testing.assert_close(model.sub_mean.bias, -255 * torch.tensor(DF2K_RGB_MEAN))


@pytest.mark.parametrize("arch", ["visattn_rcan_x2", "visattn_han_x2"])
def test_grad_checkpointing_same_gradients(arch):
    model = timm.create_model(arch, num_groups=2, num_blocks=1, num_feats=8, reduction=4)
    for m in model.modules():  # non-zero gammas so HAN's attention branches carry gradient
        if hasattr(m, "gamma"):
            m.gamma.data.fill_(0.5)
    x = torch.rand(1, 3, 8, 8)
    grads = []
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        model.zero_grad()
        model(x).square().sum().backward()
        grads.append(model.conv_first.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
@pytest.mark.parametrize("arch", ["visattn_rcan_x3", "visattn_han_x2"])
def test_torchscript_same_output(arch):
    model = timm.create_model(arch, num_groups=2, num_blocks=1, num_feats=8, reduction=4).eval()
    x = torch.rand(1, 3, 9, 11)
    scripted = torch.jit.script(model)
    torch.testing.assert_close(_sr(scripted, x), _sr(model, x), rtol=0, atol=0)
