"""HAT: the official golden and the nine manifests through ``visattn.from_official``, the two
persistent index buffers of real checkpoints, released checkpoint wrappers, scale / family
mismatches, the window-attention layers against ``visattn.kernels.na2d``, the timm entry points,
any input size and bad input."""
import hashlib

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models import get_arch_pretrained_cfgs

import visattn
import visattn.models.hat  # noqa: F401  (registers the HAT models and official class)
from visattn.kernels import na2d
from visattn.layers.window_attention import OverlappingWindowAttention, WindowAttention
from visattn.models.hat import HAT, checkpoint_filter_fn, official_relative_position_index
from golden_data import load_golden, load_manifest, manifest_names

HAT_MANIFESTS = manifest_names("XPixelGroup/HAT")
# Registered name -> manifest of the official config it builds.
ENTRYPOINTS = {f"visattn_hat{size}_x{s}": f"HAT{official}_SRx{s}"
               for size, official in (("_s", "-S"), ("", ""), ("_l", "-L")) for s in (2, 3, 4)}
# The golden's reduced config as visattn_hat_x2 kwargs.
GOLDEN_KWARGS = dict(embed_dim=24, depths=(2, 2), num_heads=(2, 2), compress_ratio=3, squeeze_factor=6)


def _index_buffers():
    """The two persistent int64 buffers of real HAT checkpoints (window 16, OCAB window 24), recomputed."""
    return {"relative_position_index_SA": official_relative_position_index(16, 16),
            "relative_position_index_OCA": official_relative_position_index(16, 24)}


def _sr(model, x):
    with torch.no_grad():
        return model(x)


def _assert_golden(model, meta, io):
    assert meta["value_range"] == 1
    torch.testing.assert_close(_sr(model, io["input"]), io["output"], rtol=0, atol=meta["recommended_atol"])


def test_golden():
    """The official output at the golden's recommended tolerance (the golden omits the index buffers)."""
    meta, sd, io = load_golden("hat")
    model = visattn.from_official(meta, sd)
    assert type(model) is HAT and not model.training and model.upscale == 2
    _assert_golden(model, meta, io)


def test_recomputed_index_buffers_are_the_official_bytes():
    """The index this package computes is byte-identical to the buffers the golden left out."""
    meta, _, _ = load_golden("hat")
    for key, value in _index_buffers().items():
        entry = meta["omitted_state_dict_entries"][key]
        assert list(value.shape) == entry["shape"] and value.dtype == torch.int64
        assert hashlib.sha256(value.numpy().tobytes()).hexdigest() == entry["sha256_of_raw_bytes"]


def test_real_checkpoint_with_index_buffers():
    meta, sd, io = load_golden("hat")
    _assert_golden(visattn.from_official(meta, {"params_ema": {**_index_buffers(), **sd}}), meta, io)


@pytest.mark.parametrize("key, bad", [
    ("relative_position_index_SA", lambda t: t.flip(0)),
    ("relative_position_index_OCA", lambda t: t % 1521),  # the official buffer is negative in places
    ("relative_position_index_SA", lambda t: official_relative_position_index(8, 8)),  # another window
])
def test_wrong_index_buffer_raises(key, bad):
    meta, sd, _ = load_golden("hat")
    buffers = _index_buffers()
    buffers[key] = bad(buffers[key])
    with pytest.raises(visattn.CheckpointMismatchError, match=key):
        visattn.from_official(meta, {**buffers, **sd})


@pytest.mark.parametrize("wrap", [
    lambda sd: {"params": sd},
    lambda sd: {"params_ema": sd, "params": {k: torch.zeros_like(v) for k, v in sd.items()}},
    lambda sd: {f"module.{k}": v for k, v in sd.items()},
], ids=["params", "params_ema_preferred", "module_prefix"])
def test_wrapped_checkpoints(wrap):
    meta, sd, io = load_golden("hat")
    _assert_golden(visattn.from_official(meta, wrap(sd)), meta, io)


@pytest.mark.parametrize("name", HAT_MANIFESTS)
@pytest.mark.filterwarnings("ignore:for .*copying from a non-meta parameter")
def test_manifest(name):
    """Every released config loads strictly from its full official key list (index buffers
    included); the parameter count is exact and the buffers are the only keys visattn drops.

    Keys, shapes and the index buffers are what is checked here (the golden checks values), so
    the model is built on the meta device and the weights are zero-stride zeros: HAT-L in
    well under a second instead of a full CPU initialisation.
    """
    manifest = load_manifest(name)
    buffers = _index_buffers()
    sd = {key: buffers[key] if key in buffers else torch.zeros(()).expand(shape)
          for key, shape in manifest["state_dict"]}
    assert {k for k, v in sd.items() if v.dtype == torch.int64} == set(manifest["state_dict_buffers"])
    with torch.device("meta"):
        model = visattn.from_official(manifest, sd)
    assert sum(p.numel() for p in model.parameters()) == manifest["num_params"]
    assert len(model.state_dict()) == manifest["num_state_dict_tensors"] - len(buffers)


def test_manifests_cover_the_released_variants():
    assert set(HAT_MANIFESTS) == set(ENTRYPOINTS.values())


@pytest.mark.parametrize("name", sorted(ENTRYPOINTS))
def test_timm_entrypoints_match_official_sizes(name):
    manifest = load_manifest(ENTRYPOINTS[name])
    with torch.device("meta"):
        model = timm.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == manifest["num_params"]
    assert model.upscale == manifest["constructor_kwargs"]["upscale"]
    cfg = model.pretrained_cfg
    assert cfg["url"] == "" and cfg["num_classes"] == 0 and cfg["mean"] == (0.0, 0.0, 0.0)
    assert any(".pth" in note for note in cfg["notes"])  # the release file name, no invented URL


def test_pretrained_tags():
    """HAT-S and HAT are released trained on DF2K; HAT and HAT-L also ImageNet-pretrained + DF2K."""
    names = {name for n in ENTRYPOINTS for name in get_arch_pretrained_cfgs(n)}
    assert names == {f"{n}.df2k" for n in ENTRYPOINTS if "_l_" not in n} | {
        f"{n}.in1k_ft_df2k" for n in ENTRYPOINTS if "_s_" not in n}


def test_timm_pretrained_file_and_scale_mismatch(tmp_path):
    """A released-format file loads through timm; an x2 file into an x4 model raises before loading."""
    meta, sd, io = load_golden("hat")
    path = tmp_path / "HAT_SRx2.pth"
    torch.save({"params_ema": {**_index_buffers(), **sd}}, path)
    model = timm.create_model("visattn_hat_x2", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                              **GOLDEN_KWARGS)
    _assert_golden(model.eval(), meta, io)
    with pytest.raises(visattn.CheckpointMismatchError, match=r"x2 HAT .* model is x4"):
        timm.create_model("visattn_hat_x4", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                          **GOLDEN_KWARGS)


def test_other_scale_through_from_official():
    meta, sd, _ = load_golden("hat")
    meta = {**meta, "constructor_kwargs": {**meta["constructor_kwargs"], "upscale": 4}}
    with pytest.raises(visattn.CheckpointMismatchError, match="x2"):
        visattn.from_official(meta, sd)


def test_other_family_checkpoint_is_named():
    meta, _, _ = load_golden("hat")
    _, nat_sd, _ = load_golden("nat")
    with pytest.raises(visattn.CheckpointMismatchError, match="NAT"):
        visattn.from_official(meta, nat_sd)


def test_missing_key_is_named_and_nothing_loads():
    meta, sd, _ = load_golden("hat")
    model = HAT(upscale=2, **GOLDEN_KWARGS)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sd = {k: v for k, v in sd.items() if k != "layers.1.residual_group.overlap_attn.qkv.weight"}
    with pytest.raises(visattn.CheckpointMismatchError, match=r"groups\.1\.overlap_attn\.attn\.qkv\.weight"):
        model.load_state_dict(checkpoint_filter_fn(sd, model))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_visattn_state_dict_passes_unchanged():
    meta, sd, io = load_golden("hat")
    own = visattn.from_official(meta, sd).state_dict()
    assert not any("relative_position" in k for k in own)
    model = HAT(upscale=2, **GOLDEN_KWARGS).eval()
    model.load_state_dict(checkpoint_filter_fn(own, model))
    _assert_golden(model, meta, io)


@pytest.mark.parametrize("size", [(13, 17), (40, 40)])
def test_any_input_size(size):
    """Sides that are no multiple of the window: reflect-padded inside, output cropped to scale x."""
    meta, sd, _ = load_golden("hat")
    model = visattn.from_official(meta, sd)
    x = torch.rand(1, 3, *size)
    out = _sr(model, x)
    assert out.shape == (1, 3, 2 * size[0], 2 * size[1])
    padded = F.pad(x, (0, -size[1] % 16, 0, -size[0] % 16), mode="reflect")  # hat_model.py's padding
    torch.testing.assert_close(out, _sr(model, padded)[..., : 2 * size[0], : 2 * size[1]], rtol=0, atol=1e-6)


def test_batch_matches_single_images():
    """Shifted-window masks are shared over the batch: a batch of two equals two single runs."""
    meta, sd, _ = load_golden("hat")
    model = visattn.from_official(meta, sd)
    x = torch.rand(2, 3, 32, 48)
    torch.testing.assert_close(_sr(model, x), torch.cat([_sr(model, x[:1]), _sr(model, x[1:])]), rtol=0, atol=1e-5)


@pytest.mark.parametrize("x, match", [
    (torch.rand(1, 1, 32, 32), "expects 3 input channels"),
    (torch.rand(3, 32, 32), r"image batch \[B, 3, H, W\]"),
    ((torch.rand(1, 3, 32, 32) * 255).to(torch.uint8), "floating-point"),
])
def test_bad_input(x, match):
    model = HAT(upscale=2, **GOLDEN_KWARGS)
    with pytest.raises(ValueError, match=match):
        model(x)


def test_classifier_kwargs_rejected():
    with pytest.raises(ValueError, match="no classifier"):
        timm.create_model("visattn_hat_x2", num_classes=10, **GOLDEN_KWARGS)


def test_grad_checkpointing_same_gradients():
    # No drop path: the two runs would draw different masks.
    model = timm.create_model("visattn_hat_x2", drop_path_rate=0.0, **GOLDEN_KWARGS)
    x = torch.rand(1, 3, 16, 16)
    grads = []
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        model.zero_grad()
        model(x).sum().backward()
        grads.append(model.conv_first.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning",
                            "ignore:NOTE. The nodes obtained by tracing:UserWarning")
def test_torchscript_and_fx():
    """TorchScript and torch.fx (timm's notrace leaves) give the eager output, padding included."""
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names
    from timm.models import get_notrace_functions, get_notrace_modules

    model = HAT(upscale=2, **GOLDEN_KWARGS).eval()
    x = torch.rand(1, 3, 20, 24)
    expected = _sr(model, x)
    torch.testing.assert_close(_sr(torch.jit.script(model), x), expected, rtol=0, atol=1e-6)
    tracer_kwargs = dict(leaf_modules=list(get_notrace_modules()), autowrap_functions=list(get_notrace_functions()))
    last = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)[1][-1]  # the output crop
    traced = create_feature_extractor(model, return_nodes={last: "out"}, tracer_kwargs=tracer_kwargs)
    torch.testing.assert_close(_sr(traced, x)["out"], expected, rtol=0, atol=1e-6)


def test_unshifted_window_attention_equals_na2d():
    """The rpb layout is na2d's: with stride == kernel == window the two compute the same thing."""
    layer = WindowAttention(16, 2, 8).double()
    x = torch.randn(2, 16, 24, 16, dtype=torch.float64)
    q, k, v = layer.qkv(x).view(2, 16, 24, 3, 2, 8).unbind(3)
    expected = layer.proj(na2d(q, k, v, 8, stride=8, rpb=layer.rpb, backend="reference").reshape(2, 16, 24, 16))
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("windows", [(1, 1), (1, 3), (3, 1), (2, 3)])
def test_shifted_window_attention_brute_force(windows):
    """Shifted windows against explicit attention on the rolled map: each query attends to its
    window with the rpb, and -100 (Swin's mask) for tokens that wrapped around from another region."""
    ws, shift = 4, 2
    layer = WindowAttention(8, 2, ws, shift).double()
    H, W = windows[0] * ws, windows[1] * ws
    x = torch.randn(1, H, W, 8, dtype=torch.float64)
    rolled = torch.roll(x, (-shift, -shift), (1, 2))
    q, k, v = layer.qkv(rolled).view(1, H, W, 3, 2, 4).unbind(3)

    def region(i, size):
        return 0 if i < size - ws else (1 if i < size - shift else 2)

    expected = torch.zeros(H, W, 2, 4, dtype=torch.float64)
    for y in range(H):
        for x_ in range(W):
            y0, x0 = y // ws * ws, x_ // ws * ws
            logits, values = [], []
            for ky in range(y0, y0 + ws):
                for kx in range(x0, x0 + ws):
                    same = (region(ky, H), region(kx, W)) == (region(y, H), region(x_, W))
                    logits.append((q[0, y, x_] * k[0, ky, kx]).sum(-1) * layer.scale
                                  + layer.rpb[:, ky - y + ws - 1, kx - x_ + ws - 1] + (0.0 if same else -100.0))
                    values.append(v[0, ky, kx])
            expected[y, x_] = (torch.stack(logits).softmax(0)[..., None] * torch.stack(values)).sum(0)
    expected = torch.roll(layer.proj(expected.reshape(1, H, W, 8)), (shift, shift), (1, 2))
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-12)


def test_overlapping_attention_brute_force():
    """OCAB against attention over explicit key lists: each query window attends to the o x o
    window centred on it (zero keys/values beyond the border), bias by (key - query) offset."""
    layer = OverlappingWindowAttention(8, 2, 4, 0.5).double()
    x = torch.randn(1, 8, 12, 8, dtype=torch.float64)
    q, k, v = layer.qkv(x).view(1, 8, 12, 3, 2, 4).unbind(3)
    expected = torch.zeros(8, 12, 2, 4, dtype=torch.float64)
    for y in range(8):
        for x_ in range(12):
            y0, x0 = y // 4 * 4 - 1, x_ // 4 * 4 - 1  # overlap window 6 = window 4 + 1 each side
            logits, values = [], []
            for ky in range(y0, y0 + 6):
                for kx in range(x0, x0 + 6):
                    inside = 0 <= ky < 8 and 0 <= kx < 12
                    key = k[0, ky, kx] if inside else torch.zeros(2, 4, dtype=torch.float64)
                    logits.append((q[0, y, x_] * key).sum(-1) * layer.scale + layer.rpb[:, ky - y + 4, kx - x_ + 4])
                    values.append(v[0, ky, kx] if inside else torch.zeros(2, 4, dtype=torch.float64))
            weights = torch.stack(logits).softmax(0)  # [keys, heads]
            expected[y, x_] = (weights[..., None] * torch.stack(values)).sum(0)
    torch.testing.assert_close(layer(x)[0], layer.proj(expected.reshape(8, 12, 8)), rtol=0, atol=1e-12)


@pytest.mark.parametrize("layer", [WindowAttention(8, 2, 4, 2), OverlappingWindowAttention(8, 2, 4)])
def test_layers_reject_sizes_off_the_window(layer):
    with pytest.raises(ValueError, match="multiples of the window 4"):
        layer(torch.randn(1, 6, 8, 8))


@pytest.mark.parametrize("layer", [WindowAttention(8, 2, 4, 2), OverlappingWindowAttention(8, 2, 4)])
def test_inference_bias_cache_follows_the_table(layer):
    """The expanded bias kept between no-grad calls is rebuilt when the table changes in place
    (as load_state_dict does), and training calls still give the table a gradient."""
    x = torch.randn(1, 8, 8, 8)
    with torch.no_grad():
        before = layer(x)
        noise = torch.randn_like(layer.rpb)
        layer.rpb.add_(noise)
        after = layer(x)
        layer.rpb.sub_(noise)
        again = layer(x)
    assert (before - after).abs().max() > 1e-3
    torch.testing.assert_close(again, before)
    layer(x).sum().backward()
    assert layer.rpb.grad is not None and layer.rpb.grad.abs().sum() > 0
