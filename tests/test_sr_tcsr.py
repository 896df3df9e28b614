"""TCSR (no official code or weights): parameter counts against the paper, the spatial shift and
its MLP against explicit loops, the NA module on visattn.kernels (reference and Triton backends
agree), any input size, checkpoint loading and bad input."""
import pytest
import timm
import torch

import visattn
from visattn.layers.spatial_shift import ShiftMlp, spatial_shift
from visattn.models.tcsr import TCSR, checkpoint_filter_fn

# Parameter counts the paper reports (Aitical/TCSR README table, x4).
PAPER_PARAMS = {"visattn_tcsr_b_x4": 682_000, "visattn_tcsr_l_x4": 1_030_000}


def _small(**kwargs) -> TCSR:
    torch.manual_seed(0)
    return TCSR(**{**dict(upscale=2, embed_dim=32, depths=(2, 1), num_heads=(2, 2), kernel_size=5), **kwargs}).eval()


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS))
def test_parameter_counts_match_the_paper(name):
    with torch.device("meta"):
        model = timm.create_model(name)
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - PAPER_PARAMS[name]) / PAPER_PARAMS[name] < 0.02, count


def _shift_loops(x: torch.Tensor) -> torch.Tensor:
    """The spatial shift written out pixel by pixel."""
    B, H, W, C = x.shape
    g = C // 4
    out = torch.zeros_like(x)
    for i in range(H):
        for j in range(W):
            for c in range(C):
                di, dj = {0: (0, -1), 1: (0, 1), 2: (-1, 0), 3: (1, 0)}.get(c // g if c < 4 * g else 4, (0, 0))
                si, sj = i + di, j + dj
                if 0 <= si < H and 0 <= sj < W:
                    out[:, i, j, c] = x[:, si, sj, c]
    return out


@pytest.mark.parametrize("channels", [4, 9, 16])
def test_spatial_shift_matches_loops(channels):
    x = torch.randn(2, 5, 7, channels, dtype=torch.float64)
    torch.testing.assert_close(spatial_shift(x), _shift_loops(x), rtol=0, atol=0)


def test_spatial_shift_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
        spatial_shift(torch.zeros(3, 4, 5))
    with pytest.raises(ValueError, match="at least 4 channels"):
        spatial_shift(torch.zeros(1, 4, 5, 3))


def test_shift_mlp_forward_and_gradients():
    torch.manual_seed(0)
    mlp = ShiftMlp(8, 12).double()
    x = torch.randn(1, 4, 6, 8, dtype=torch.float64, requires_grad=True)
    h = mlp.act(mlp.fc1(x))
    torch.testing.assert_close(mlp(x), mlp.fc2(h + _shift_loops(h)))
    # The shift mixes neighbours: a change at one pixel reaches its four neighbours, not farther.
    (grad,) = torch.autograd.grad(mlp(x)[0, 2, 3].sum(), x)
    touched = {(i, j) for i, j in (grad[0].abs().sum(-1) > 0).nonzero().tolist()}
    assert touched == {(2, 3), (2, 2), (2, 4), (1, 3), (3, 3)}


def test_attention_runs_on_the_kernel_layer(monkeypatch):
    """The NA modules call visattn.kernels.na2d_qkv (and its rpb); the Triton backend (through
    the interpreter on CPU) gives the reference backend's output."""
    model = _small()
    x = torch.rand(1, 3, 11, 13)
    calls = []
    import visattn.layers.neighborhood_attention as na_module

    real = na_module.na2d_qkv
    monkeypatch.setattr(na_module, "na2d_qkv", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    with torch.no_grad():
        ref = model(x)
    assert calls == [(5, 5)] * 3
    monkeypatch.undo()
    for m in model.modules():
        if isinstance(m, visattn.layers.NeighborhoodAttention2d):
            m.backend = "triton"
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("size", [(1, 1), (4, 9), (17, 6)])
def test_any_input_size(size):
    model = _small(upscale=3)
    x = torch.rand(2, 3, *size)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 3, 3 * size[0], 3 * size[1]) and torch.isfinite(out).all()


def test_backward_reaches_every_parameter():
    model = _small().train()
    model(torch.rand(2, 3, 9, 10)).abs().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_grad_checkpointing_gives_the_same_gradients():
    model = _small().train()
    x = torch.rand(1, 3, 8, 8)
    model(x).sum().backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, plain[n], msg=n)


def test_checkpoints_load_strictly():
    model = _small()
    sd = model.state_dict()
    other = _small()
    for wrapped in ({"params_ema": sd}, {"state_dict": {f"module.{k}": v for k, v in sd.items()}}):
        other.load_state_dict(checkpoint_filter_fn(wrapped, other))
        x = torch.rand(1, 3, 6, 7)
        with torch.no_grad():
            torch.testing.assert_close(other(x), model(x))
    with pytest.raises(visattn.CheckpointMismatchError):
        checkpoint_filter_fn({k: v for k, v in sd.items() if "groups.1" not in k}, other)
    with pytest.raises(visattn.CheckpointMismatchError):
        checkpoint_filter_fn(_small(upscale=3).state_dict(), other)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="upscale must be 2, 3 or 4"):
        TCSR(upscale=8)
    with pytest.raises(ValueError, match="num_classes"):
        TCSR(num_classes=10)
    with pytest.raises(ValueError, match="depths"):
        TCSR(depths=(2, 2), num_heads=(2,))
    with pytest.raises(ValueError, match="floating-point"):
        _small()(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError):
        _small()(torch.zeros(1, 4, 8, 8))
