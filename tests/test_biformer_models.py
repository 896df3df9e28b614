"""BiFormer: official goldens (outputs and routing choices) and manifests through
``visattn.from_official``, the timm entry points, auto_pad, and bad input."""
import pytest
import timm
import torch

import visattn
from visattn.kernels import region_topk_2d
from visattn.layers import BiLevelRoutingAttention
from visattn.layers import routed_attention as routed_attention_layers
from golden_data import load_golden, load_manifest, manifest_names

BIFORMER_MANIFESTS = manifest_names("BiFormer")


def _capture_routing(model, monkeypatch):
    """Record the routing index of each BRA layer (they run in module order), keyed like the
    goldens (``stages.<s>.<b>``)."""
    keys = [name.replace(".blocks.", ".").removesuffix(".attn")
            for name, m in model.named_modules() if isinstance(m, BiLevelRoutingAttention)]
    calls = []

    def recording_topk(*args, **kwargs):
        calls.append(region_topk_2d(*args, **kwargs))
        return calls[-1]

    monkeypatch.setattr(routed_attention_layers, "region_topk_2d", recording_topk)
    return lambda: dict(zip(keys, calls))


@pytest.mark.parametrize("name", ["biformer", "biformer_mm"])
def test_golden(name, monkeypatch):
    """Official outputs at the golden tolerance, and the same routed regions in every BRA block."""
    meta, sd, io = load_golden(name)
    model = visattn.from_official(meta, sd)
    captured = _capture_routing(model, monkeypatch)
    with torch.no_grad():
        out = model(io["input"])
    routing = captured()
    if meta["task"] == "dense":
        assert len(out) == 4
        for i, o in enumerate(out):
            torch.testing.assert_close(o, io[f"output.{i}"], rtol=0, atol=meta["recommended_atol"])
    else:
        torch.testing.assert_close(out, io["output"], rtol=0, atol=meta["recommended_atol"])
    expected = {k.removeprefix("routing_topk_index."): v for k, v in io.items() if k.startswith("routing_topk_index.")}
    assert set(routing) == set(expected)
    for key, index in expected.items():
        assert torch.equal(routing[key].sort(-1).values, index.sort(-1).values), key


def test_released_wrapper_and_segmentor_prefix():
    meta, sd, io = load_golden("biformer")
    model = visattn.from_official(meta, {"model": sd})  # as released
    with torch.no_grad():
        torch.testing.assert_close(model(io["input"]), io["output"], rtol=0, atol=meta["recommended_atol"])
    meta, sd, io = load_golden("biformer_mm")
    model = visattn.from_official(meta, {"state_dict": {f"backbone.{k}": v for k, v in sd.items()}})
    with torch.no_grad():
        torch.testing.assert_close(model(io["input"])[3], io["output.3"], rtol=0, atol=meta["recommended_atol"])


@pytest.mark.parametrize("name", BIFORMER_MANIFESTS)
def test_manifest(name):
    """Every full-size official state dict loads strictly and the parameter count is exact."""
    manifest = load_manifest(name)
    sd = {key: torch.zeros(shape) for key, shape in manifest["state_dict"]}
    model = visattn.from_official(manifest, sd)
    assert sum(p.numel() for p in model.parameters()) == manifest["num_params"]


def test_manifests_cover_the_released_variants():
    assert {"biformer_tiny", "biformer_small", "biformer_base", "biformer_small_mm_ade20k"} <= set(BIFORMER_MANIFESTS)


@pytest.mark.parametrize("name, params", [("visattn_biformer_t", 13_142_760), ("visattn_biformer_s", 25_536_232),
                                          ("visattn_biformer_b", 56_804_968)])
def test_timm_entrypoints_match_official_sizes(name, params):
    with torch.device("meta"):
        model = timm.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == params


def test_timm_features_and_pretrained_filter(tmp_path):
    """features_only gives the four NCHW stage maps; an official-format file loads through timm."""
    meta, sd, _ = load_golden("biformer")
    kwargs = dict(depths=[1, 1, 2, 1], embed_dims=[16, 32, 40, 48], qk_dims=[16, 32, 40, 48], head_dim=8, num_classes=10)
    path = tmp_path / "biformer_official.pth"
    torch.save({"model": sd}, path)
    model = timm.create_model("visattn_biformer_t", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs)
    reference = visattn.from_official(meta, sd)
    x = torch.randn(1, 3, 112, 112)
    with torch.no_grad():  # timm re-initialises a head for num_classes != 1000: compare the features
        torch.testing.assert_close(model.eval().forward_features(x), reference.forward_features(x), rtol=0, atol=1e-6)
    feats = timm.create_model("visattn_biformer_t", features_only=True, **{k: v for k, v in kwargs.items() if k != "num_classes"})
    maps = feats(x)
    assert [tuple(m.shape[1:]) for m in maps] == [(16, 28, 28), (32, 14, 14), (40, 7, 7), (48, 4, 4)]


def test_dense_backbone_pads_any_size():
    """auto_pad: sizes that no n_win divides run (padded before qkv, cropped after)."""
    model = visattn.models.BiFormerDenseBackbone(depths=(1, 1, 1, 1), embed_dims=(8, 16, 24, 32), head_dim=4, n_win=4).eval()
    with torch.no_grad():
        maps = model(torch.randn(1, 3, 70, 90))
    assert [tuple(m.shape[2:]) for m in maps] == [(18, 23), (9, 12), (5, 6), (3, 3)]


def test_grad_checkpointing_same_gradients():
    torch.manual_seed(0)
    model = timm.create_model("visattn_biformer_t", depths=(1, 1, 1, 1), num_classes=5)
    x = torch.randn(2, 3, 112, 112)
    grads = []
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        model.zero_grad()
        model(x).sum().backward()
        grads.append(model.stem[0].weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("x, match", [
    (torch.randn(1, 3, 100, 100), r"a 100x100 input gives a 25x25 map at stage 1 \(stride 4\), which n_win=7 does not "
                                  r"divide; .* a multiple of 112 per side \(or auto_pad=True\)"),
    (torch.randn(1, 1, 224, 224), r"expects 3 input channels"),
])
def test_bad_input(x, match):
    model = timm.create_model("visattn_biformer_t", depths=(1, 1, 1, 1))
    with pytest.raises(ValueError, match=match):
        model(x)
    with pytest.raises(ValueError, match=match):
        model.forward_intermediates(x)


def test_bad_sizes_at_construction():
    with pytest.raises(ValueError, match=r"img_size \(100, 100\) must be a multiple of 16 \* n_win = 112"):
        timm.create_model("visattn_biformer_t", img_size=100)
    with pytest.raises(ValueError, match=r"topks\[2\] = 50 routes to more key regions than stage 3's n_win x n_win = 49; "
                                         r"expected 1 to 49"):
        timm.create_model("visattn_biformer_t", topks=(1, 4, 50, -2))
    with pytest.raises(ValueError, match=r"topk must be in \[1, 16\] .* got 17"):
        BiLevelRoutingAttention(8, 2, n_win=4, qk_dim=8, topk=17)


def test_dense_input_smaller_than_the_regions():
    """auto_pad pads to a multiple of n_win, but a routed stage's map needs a token per region:
    n_win=4 needs stage-3 maps (stride 16) of 4, so inputs of at least 3 * 16 + 1 = 49 pixels."""
    model = visattn.models.BiFormerDenseBackbone(depths=(1, 1, 1, 1), embed_dims=(8, 16, 24, 32), head_dim=4, n_win=4).eval()
    with torch.no_grad():
        assert [tuple(m.shape[2:]) for m in model(torch.randn(1, 3, 49, 64))] == [(13, 16), (7, 8), (4, 4), (2, 2)]
        with pytest.raises(ValueError, match=r"a 48x64 input gives a 3x4 map at stage 3 \(stride 16\), smaller than its "
                                             r"4x4 routing regions .* at least 49 pixels per side"):
            model(torch.randn(1, 3, 48, 64))
    layer = BiLevelRoutingAttention(8, 2, n_win=4, qk_dim=8, topk=2, auto_pad=True)
    with pytest.raises(ValueError, match=r"the map \(3x5\) is smaller than its n_win x n_win = 4x4 regions"):
        layer(torch.randn(1, 3, 5, 8))


@pytest.fixture(scope="module")
def biformer_tiny_official_file(tmp_path_factory):
    """A full-size official-format biformer_tiny checkpoint with random weights, nested under
    ``model`` as released."""
    gen = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(shape, generator=gen) * 0.02 for k, shape in load_manifest("biformer_tiny")["state_dict"]}
    path = tmp_path_factory.mktemp("ckpt") / "biformer_tiny.pth"
    torch.save({"model": sd}, path)
    return path, sd


def test_pretrained_adapts_stem_and_head(biformer_tiny_official_file):
    """Offline version of timm's test_model_load_pretrained (which downloads the release):
    in_chans=1 / num_classes=5 / 0, and features_only on the pretrained weights."""
    path, sd = biformer_tiny_official_file
    overlay = dict(file=str(path), url=None)
    model = timm.create_model("visattn_biformer_t", pretrained=True, pretrained_cfg_overlay=overlay, in_chans=1,
                              num_classes=5).eval()
    torch.testing.assert_close(model.stem[0].weight, sd["downsample_layers.0.0.weight"].sum(1, keepdim=True))
    torch.testing.assert_close(model.stages[2].blocks[1].attn.qkv.weight, sd["stages.2.1.attn.qkv.qkv.weight"])
    with torch.no_grad():
        assert model(torch.randn(1, 1, 224, 224)).shape == (1, 5)
    model = timm.create_model("visattn_biformer_t", pretrained=True, pretrained_cfg_overlay=overlay, num_classes=0).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 224, 224)).shape == (1, 512)
    feats = timm.create_model("visattn_biformer_t", pretrained=True, pretrained_cfg_overlay=overlay, features_only=True).eval()
    assert feats.feature_info.reduction() == [4, 8, 16, 32]
    with torch.no_grad():
        maps = feats(torch.randn(1, 3, 224, 224))
    assert [tuple(m.shape[1:]) for m in maps] == [(64, 56, 56), (128, 28, 28), (256, 14, 14), (512, 7, 7)]


def test_other_family_checkpoint_is_named():
    meta, _, _ = load_golden("biformer")
    _, nat_sd, _ = load_golden("nat")
    with pytest.raises(visattn.CheckpointMismatchError, match="NAT"):
        visattn.from_official(meta, nat_sd)


def test_golden_on_the_triton_backend():
    """The whole model on the fused routed-attention kernels (CPU: through the Triton interpreter)."""
    meta, sd, io = load_golden("biformer")
    model = visattn.from_official(meta, sd)
    layers = [m for m in model.modules() if isinstance(m, BiLevelRoutingAttention)]
    for layer in layers:
        layer.backend = "triton"
    with torch.no_grad():
        torch.testing.assert_close(model(io["input"]), io["output"], rtol=0, atol=meta["recommended_atol"])
