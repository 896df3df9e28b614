"""NAT family: official goldens and manifests through ``visattn.from_official``, offline pretrained
loading through timm, the zero-padding path, and bad-input errors."""
import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import visattn
from visattn.layers import NeighborhoodAttention2d, relative_position_index
from golden_data import load_golden, load_manifest, manifest_names

NAT_GOLDENS = ["nat", "dinat", "dinat_s", "dinat_isotropic", "vitrpb", "dinat_mm"]
NAT_MANIFESTS = manifest_names("Neighborhood-Attention-Transformer")


def _run(model, x):
    with torch.no_grad():
        return model(x)


def _assert_matches_golden(out, io, atol):
    if isinstance(out, (list, tuple)):
        assert len(out) == sum(k.startswith("output.") for k in io)
        for i, o in enumerate(out):
            torch.testing.assert_close(o, io[f"output.{i}"], rtol=0, atol=atol)
    else:
        torch.testing.assert_close(out, io["output"], rtol=0, atol=atol)


@pytest.mark.parametrize("name", NAT_GOLDENS)
def test_golden(name):
    """The official outputs are reproduced at the golden's recommended tolerance."""
    meta, sd, io = load_golden(name)
    model = visattn.from_official(meta, sd)
    assert not model.training
    assert type(model).__module__.startswith("visattn.")
    _assert_matches_golden(_run(model, io["input"]), io, meta["recommended_atol"])


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: {"model": sd},
        lambda sd: {"state_dict": sd},
        lambda sd: {"params_ema": sd, "params": {}},
        lambda sd: {f"module.{k}": v for k, v in sd.items()},
    ],
    ids=["model", "state_dict", "params_ema", "module_prefix"],
)
def test_wrapped_checkpoints(wrap):
    """Released wrappers and prefixes load to the same outputs."""
    meta, sd, io = load_golden("dinat")
    _assert_matches_golden(_run(visattn.from_official(meta, wrap(sd)), io["input"]), io, meta["recommended_atol"])


def test_dense_backbone_inside_segmentor_checkpoint():
    """A full UperNet checkpoint (``backbone.`` keys plus head keys) loads its backbone, saying so."""
    meta, sd, io = load_golden("dinat_mm")
    full = {f"backbone.{k}": v for k, v in sd.items()}
    full["decode_head.conv_seg.weight"] = torch.zeros(150, 512, 1, 1)
    with pytest.warns(UserWarning, match="leaving out 1 other keys"):
        model = visattn.from_official(meta, {"state_dict": full})
    _assert_matches_golden(_run(model, io["input"]), io, meta["recommended_atol"])


@pytest.mark.parametrize("name", NAT_MANIFESTS)
def test_manifest(name):
    """Every full-size official state dict loads strictly and the parameter count is exact."""
    manifest = load_manifest(name)
    sd = {}
    for key, shape in manifest["state_dict"]:
        if key.endswith("relative_position_index"):
            sd[key] = relative_position_index(int(round(shape[0] ** 0.5)))
        else:
            sd[key] = torch.zeros(shape)
    model = visattn.from_official(manifest, sd)
    assert sum(p.numel() for p in model.parameters()) == manifest["num_params"]


def test_manifest_list_covers_every_variant():
    expected = {
        "nat_mini", "nat_tiny", "nat_small", "nat_base", "dinat_mini", "dinat_tiny", "dinat_small", "dinat_base",
        "dinat_large", "dinat_large_384", "dinat_large_384_11x11", "dinat_large_21k", "dinat_large_21k_11x11",
        "dinat_s_tiny", "dinat_s_small", "dinat_s_base", "dinat_s_large", "dinat_s_large_384", "dinat_s_large_21k",
        "nat_isotropic_small", "nat_isotropic_base", "dinat_isotropic_small", "dinat_isotropic_base",
        "vitrpb_small", "vitrpb_base", "dinat_tiny_mm_ade20k",
    }
    assert expected <= set(NAT_MANIFESTS)


# Registered model and the kwargs that shrink it to each golden's reduced official config.
_TIMM_GOLDEN = {
    "nat": ("visattn_nat_s", dict(embed_dim=8, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8), mlp_ratio=2)),
    "dinat": ("visattn_dinat_t", dict(
        embed_dim=8, depths=(2, 2, 2, 1), num_heads=(1, 2, 4, 8), mlp_ratio=2,
        dilations=[[1, 8], [1, 4], [1, 2], [1]])),
    "dinat_s": ("visattn_dinats_t", dict(
        embed_dim=8, depths=(2, 2, 2, 1), num_heads=(1, 2, 4, 8), kernel_size=3,
        dilations=[[1, 8], [1, 4], [1, 2], [1]])),
    "dinat_isotropic": ("visattn_dinat_iso_s", dict(img_size=56, patch_size=4, embed_dim=16, depth=2, num_heads=2)),
    "vitrpb": ("visattn_vitrpb_s", dict(img_size=28, patch_size=4, embed_dim=16, depth=2, num_heads=2)),
}


@pytest.mark.parametrize("name", sorted(_TIMM_GOLDEN))
@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_timm_pretrained_from_local_official_file(name, fmt, tmp_path):
    """``timm.create_model(..., pretrained=True, pretrained_cfg_overlay=dict(file=official))`` goes
    through the model's pretrained filter and reproduces the official output."""
    meta, sd, io = load_golden(name)
    path = tmp_path / f"official.{fmt}"
    if fmt == "safetensors":
        save_file(sd, str(path))
    else:
        torch.save(sd, path)
    arch, kwargs = _TIMM_GOLDEN[name]
    model = timm.create_model(
        arch, pretrained=True, num_classes=10,
        pretrained_cfg_overlay=dict(file=str(path), num_classes=10, url=None), **kwargs,
    ).eval()
    _assert_matches_golden(_run(model, io["input"]), io, meta["recommended_atol"])


@pytest.fixture(scope="module")
def nat_mini_official_file(tmp_path_factory):
    """A full-size official-format nat_mini checkpoint with random weights (the release's layout)."""
    gen = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(shape, generator=gen) * 0.02 for k, shape in load_manifest("nat_mini")["state_dict"]}
    path = tmp_path_factory.mktemp("ckpt") / "nat_mini.pth"
    torch.save(sd, path)
    return path, sd


def test_pretrained_adapts_stem_and_head(nat_mini_official_file):
    """Offline version of timm's test_model_load_pretrained: in_chans=1 / num_classes=5 / 0."""
    path, sd = nat_mini_official_file
    overlay = dict(file=str(path), url=None)
    model = timm.create_model("visattn_nat_m", pretrained=True, pretrained_cfg_overlay=overlay, in_chans=1, num_classes=5)
    torch.testing.assert_close(model.stem.conv1.weight, sd["patch_embed.proj.0.weight"].sum(1, keepdim=True))
    torch.testing.assert_close(model.stages[1].downsample.reduction.weight, sd["levels.0.downsample.reduction.weight"])
    assert _run(model.eval(), torch.randn(1, 1, 64, 64)).shape == (1, 5)
    model = timm.create_model("visattn_nat_m", pretrained=True, pretrained_cfg_overlay=overlay, num_classes=0)
    assert _run(model.eval(), torch.randn(1, 3, 64, 64)).shape == (1, 512)


def test_pretrained_features_only(nat_mini_official_file):
    """Offline version of timm's test_model_features_pretrained: NCHW maps at strides 4..32."""
    path, sd = nat_mini_official_file
    model = timm.create_model("visattn_nat_m", pretrained=True, features_only=True,
                              pretrained_cfg_overlay=dict(file=str(path), url=None)).eval()
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    feats = _run(model, torch.randn(2, 3, 96, 128))
    assert [tuple(f.shape) for f in feats] == [(2, 64, 24, 32), (2, 128, 12, 16), (2, 256, 6, 8), (2, 512, 3, 4)]


def test_neighborhood_attention_pads_small_maps():
    """A map smaller than kernel*dilation is zero-padded right/bottom before qkv and cropped
    before proj (NATTEN 0.14 behaviour), computed here explicitly on the padded map."""
    attn = NeighborhoodAttention2d(16, 2, kernel_size=3, dilation=4).eval()
    x = torch.randn(2, 5, 9, 16)
    padded = F.pad(x, (0, 0, 0, 12 - 9, 0, 12 - 5))
    q, k, v = attn.qkv(padded).reshape(2, 12, 12, 3, 2, 8).unbind(3)
    expected = attn.proj(visattn.kernels.na2d(q, k, v, 3, 4, rpb=attn.rpb)[:, :5, :9].reshape(2, 5, 9, 16))
    torch.testing.assert_close(_run(attn, x), expected)


@pytest.mark.parametrize("size", [(32, 32), (100, 130), (224, 160)])
def test_any_input_size(size):
    """Dense inputs of any size run (small ones through the padding path)."""
    model = timm.create_model("visattn_dinat_m", num_classes=3).eval()
    assert _run(model, torch.randn(1, 3, *size)).shape == (1, 3)


def test_no_weight_decay_has_every_rpb():
    model = timm.create_model("visattn_dinat_m")
    rpbs = {n for n, _ in model.named_parameters() if n.endswith("rpb")}
    assert len(rpbs) == 18 and rpbs <= model.no_weight_decay()


def test_grad_checkpointing_same_output():
    model = timm.create_model("visattn_dinats_t", num_classes=4, kernel_size=3).eval()
    x = torch.randn(1, 3, 64, 64)
    ref = _run(model, x)
    model.set_grad_checkpointing(True)
    torch.testing.assert_close(_run(model, x), ref)


@pytest.mark.parametrize(
    "x, match",
    [
        (torch.randn(1, 1, 64, 64), r"expects 3 input channels \[B, 3, H, W\]"),
        (torch.randn(3, 64, 64), r"expects an image batch \[B, 3, H, W\]"),
        (torch.randn(0, 3, 64, 64), r"empty batch"),
    ],
    ids=["channels", "rank", "empty"],
)
def test_bad_input(x, match):
    model = timm.create_model("visattn_nat_m").eval()
    with pytest.raises(ValueError, match=match):
        model(x)


def test_checkpoint_mismatch_lists_keys():
    """Missing, unexpected and mis-shaped keys are all named; nothing loads partially."""
    meta, sd, _ = load_golden("nat")
    broken = dict(sd)
    del broken["levels.0.blocks.0.attn.rpb"]
    broken["levels.0.blocks.0.attn.extra"] = torch.zeros(1)
    broken["head.weight"] = torch.zeros(11, 64)
    with pytest.raises(visattn.CheckpointMismatchError) as err:
        visattn.from_official(meta, broken)
    msg = str(err.value)
    assert "missing keys (1): stages.0.blocks.0.attn.rpb" in msg
    assert "unexpected keys (1): stages.0.blocks.0.attn.extra" in msg
    assert "head.fc.weight (checkpoint (11, 64), model (10, 64))" in msg


def test_other_family_checkpoint_is_named():
    """A checkpoint of another family says which family it looks like."""
    meta, _, _ = load_golden("nat")
    _, biformer_sd, _ = load_golden("biformer")
    with pytest.raises(visattn.CheckpointMismatchError, match="looks like: BiFormer"):
        visattn.from_official(meta, {"model": biformer_sd})
    _, dinats_sd, _ = load_golden("dinat_s")
    with pytest.raises(visattn.CheckpointMismatchError, match="DiNAT_s"):
        visattn.from_official(meta, dinats_sd)


def test_unknown_official_class():
    with pytest.raises(ValueError, match="unknown official class 'x.py::Nope'"):
        visattn.from_official({"official_class": "x.py::Nope", "constructor_kwargs": {}}, {})


def test_vitrpb_rejects_other_sizes_and_wrong_index():
    meta, sd, _ = load_golden("vitrpb")
    model = visattn.from_official(meta, sd)
    with pytest.raises(ValueError, match="expects a 7x7 map"):
        model(torch.randn(1, 3, 32, 32))
    bad = copy.deepcopy(sd)
    key = next(k for k in bad if k.endswith("relative_position_index"))
    bad[key] = bad[key].flip(0)
    with pytest.raises(visattn.CheckpointMismatchError, match="relative_position_index"):
        visattn.from_official(meta, bad)
