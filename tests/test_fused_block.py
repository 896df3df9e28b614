"""The fused transformer block (visattn.layers.fused_block): one autograd node with a hand-written
backward must give the modular block's output and gradients (CPU, Triton NA and LayerNorm in the
interpreter), take the fused path only where it computes the same function, and leave TorchScript,
torch.fx, grad checkpointing and the LayerNorm backward's residual input right."""
import collections

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from timm.layers import Mlp

from visattn.kernels.layer_norm import layer_norm_backward, layer_norm_forward
from visattn.layers import AttentionLePE, BiLevelRoutingAttention, NeighborhoodAttention2d, NHWCTransformerBlock
from visattn.models.biformer import BiFormerBlock


def _block(layer_scale=None, drop_path=0.0, backend="triton", kernel_size=3, dilation=2, **kwargs):
    torch.manual_seed(0)
    attn = NeighborhoodAttention2d(32, 2, kernel_size, dilation=dilation, backend=backend)
    return NHWCTransformerBlock(32, attn, mlp_ratio=3.0, layer_scale=layer_scale, drop_path=drop_path,
                                autocast_norm_output=True, **kwargs)


def _run(block, x, fused, autocast_dtype=None, nhwc=True):
    """Output, input gradient and parameter gradients of one forward / backward (``nhwc``: the
    block takes ``x`` as it is, else NCHW ``x`` it permutes itself)."""
    block.fused = fused
    torch.manual_seed(1)  # the same drop-path draw on both paths
    x = x.detach().requires_grad_()
    block.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=autocast_dtype or torch.float16, enabled=autocast_dtype is not None):
        assert block.fused_path_taken(x if nhwc else x.permute(0, 2, 3, 1)) == fused
        out = block(x)
    weights = torch.linspace(-1, 1, out.shape[-1])
    (out.float() * weights).sum().backward()
    return out.detach(), x.grad, {n: p.grad for n, p in block.named_parameters()}


@pytest.mark.parametrize("layer_scale, drop_path", [(None, 0.0), (0.1, 0.3)], ids=["plain", "scale+droppath"])
@pytest.mark.parametrize("shape", [(2, 7, 9, 32), (1, 6, 6, 32)], ids=["ragged", "square"])
def test_fused_matches_modular_fp32(layer_scale, drop_path, shape):
    block = _block(layer_scale, drop_path).train()
    x = torch.randn(shape)
    out_m, gx_m, grads_m = _run(block, x, fused=False)
    out_f, gx_f, grads_f = _run(block, x, fused=True)
    assert out_f.dtype == out_m.dtype == torch.float32
    # The modular block's CPU LayerNorm is F.layer_norm, the fused one's the Triton kernel: fp32 rounding apart.
    torch.testing.assert_close(out_f, out_m, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx_f, gx_m, rtol=1e-5, atol=1e-5)
    assert grads_f.keys() == grads_m.keys() and len(grads_m) == 13 + (layer_scale is not None) * 2
    for name, g in grads_m.items():
        assert grads_f[name] is not None and grads_f[name].dtype == g.dtype, name
        torch.testing.assert_close(grads_f[name], g, rtol=1e-4, atol=1e-5, msg=name)


def test_drop_path_drops_the_same_samples():
    """At drop rate 0.5 with 4 samples, some rows of the residual branch are dropped: the fused
    path must drop the same ones (timm's draw, per sample) or its output differs."""
    block = _block(drop_path=0.5).train()
    x = torch.randn(4, 6, 6, 32)
    out_m = _run(block, x, fused=False)[0]
    out_f = _run(block, x, fused=True)[0]
    torch.testing.assert_close(out_f, out_m, rtol=1e-5, atol=1e-5)
    block.eval()
    assert not torch.allclose(_run(block, x, fused=True)[0], out_m)  # the draw mattered


def test_fused_matches_modular_under_autocast():
    """fp16 autocast on the CPU (the interpreter's bf16 is wrong): the fused ops cast as autocast
    does, so outputs and gradients agree to fp16 rounding and have the modular dtypes."""
    block = _block(layer_scale=0.5).train()
    x = torch.randn(2, 7, 6, 32)
    out_m, gx_m, grads_m = _run(block, x, fused=False, autocast_dtype=torch.float16)
    out_f, gx_f, grads_f = _run(block, x, fused=True, autocast_dtype=torch.float16)
    assert out_f.dtype == out_m.dtype == torch.float32
    torch.testing.assert_close(out_f, out_m, rtol=5e-3, atol=5e-3)
    torch.testing.assert_close(gx_f, gx_m, rtol=5e-3, atol=5e-3)
    for name, g in grads_m.items():
        assert grads_f[name].dtype == g.dtype == torch.float32, name
        torch.testing.assert_close(grads_f[name], g, rtol=2e-2, atol=2e-2 * g.abs().max().item(), msg=name)


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def test_fused_forward_casts_the_linear_weights_in_one_copy_per_block():
    """Under autocast the fused forward casts the attention's and the MLP's Linear parameters in one
    multi-tensor copy (not a cast each: host time), and nothing else of the block's."""
    block = _block().train()
    x = torch.randn(1, 6, 6, 32)
    with torch.autocast("cpu", dtype=torch.float16), _CountOps() as ops:
        block(x)
    assert ops.counts["_foreach_copy_"] == 1 and ops.counts["_to_copy"] == 0, ops.counts


def test_fused_block_adds_residuals_and_sums_columns_in_its_kernels():
    """With layer scales and drop paths, the fused block's residual adds, drop-path and layer-scale
    products run inside the LayerNorm kernels (no ATen element-wise op), and its column sums (norms,
    layer scales, fc2's bias) are one reduction: the backward's ATen sums are that one, the biases
    of fc1 / qkv / proj and the rpb gradient's."""
    block = _block(layer_scale=0.1, drop_path=0.3).train()
    x = torch.randn(2, 6, 6, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.float16), _CountOps() as forward_ops:
        out = block(x)
    with _CountOps() as backward_ops:
        out.backward(torch.ones_like(out))
    elementwise = {"mul", "add", "div", "div_", "mul_", "add_", "sub"}
    assert not elementwise & set(forward_ops.counts), forward_ops.counts
    assert forward_ops.counts["bernoulli_"] == 2, forward_ops.counts
    assert not elementwise & set(backward_ops.counts), backward_ops.counts
    assert backward_ops.counts["sum"] == 5, backward_ops.counts
    assert all(p.grad is not None for p in block.parameters())


@pytest.mark.parametrize("case", ["off", "reference backend", "padding", "proj dropout", "mlp dropout",
                                  "other mlp", "inplace layer scale", "env"])
def test_fused_path_only_where_it_computes_the_same(case, monkeypatch):
    assert _block().fused_path_taken(torch.randn(1, 8, 8, 32))
    kwargs, size = {}, 8
    if case == "mlp dropout":
        kwargs["proj_drop"] = 0.1
    block = _block(**kwargs).train()
    if case == "off":
        block.fused = False
    elif case == "reference backend":
        block.attn.backend = "reference"
    elif case == "padding":
        size = 5  # < kernel 3 x dilation 2: the module pads, the fused path does not
    elif case == "proj dropout":
        block.attn.proj_drop = nn.Dropout(0.1)
    elif case == "other mlp":
        block.mlp = Mlp(32, 96, act_layer=nn.ReLU)
    elif case == "inplace layer scale":
        block = _block(layer_scale=0.1)
        block.ls1.inplace = True
    elif case == "env":
        monkeypatch.setenv("VISATTN_FUSED_BLOCKS", "0")
    x = torch.randn(1, size, size, 32)
    assert not block.fused_path_taken(x)
    block(x).sum().backward()  # the modular path still runs


def test_dropout_off_in_eval_allows_fused():
    block = _block(proj_drop=0.1).eval()
    assert block.fused_path_taken(torch.randn(1, 8, 8, 32))


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_script_and_fx_take_the_modular_path():
    from timm.models import get_notrace_modules

    class Tracer(torch.fx.Tracer):  # timm's leaves (the attention and norm modules), as its fx helpers use
        def is_leaf_module(self, m, name):
            return type(m) in get_notrace_modules() or super().is_leaf_module(m, name)

    block = _block().eval()
    x = torch.randn(1, 8, 8, 32)
    assert block.fused_path_taken(x)
    with torch.no_grad():
        expected = block(x)
        torch.testing.assert_close(torch.jit.script(block)(x), expected, rtol=1e-5, atol=1e-5)
        graph = Tracer().trace(block)
        assert [n.target for n in graph.nodes if n.op == "call_module"][:2] == ["norm1", "attn"]
        torch.testing.assert_close(torch.fx.GraphModule(block, graph)(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_grad_checkpointing_with_fused_blocks(use_reentrant):
    """torch.utils.checkpoint (timm's checkpoint_seq) around a fused block: the recomputed forward
    saves and reads its tensors through the checkpoint's hooks, the gradients are unchanged."""
    block = _block(layer_scale=0.1).train()
    x = torch.randn(2, 6, 7, 32)
    expected = _run(block, x, fused=True)
    x = x.detach().requires_grad_()
    block.zero_grad(set_to_none=True)
    out = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=use_reentrant)
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    torch.testing.assert_close(out.detach(), expected[0])
    torch.testing.assert_close(x.grad, expected[1])
    for name, p in block.named_parameters():
        torch.testing.assert_close(p.grad, expected[2][name], msg=name)


def _biformer_block(drop_path=0.0, backend="triton", auto_pad=False):
    torch.manual_seed(0)
    attn = BiLevelRoutingAttention(32, 2, n_win=2, qk_dim=32, topk=3, auto_pad=auto_pad, backend=backend)
    return BiFormerBlock(32, attn, mlp_ratio=3.0, drop_path=drop_path)


@pytest.mark.parametrize("drop_path", [0.0, 0.3], ids=["plain", "droppath"])
@pytest.mark.parametrize("shape", [(2, 32, 6, 10), (1, 32, 8, 8)], ids=["ragged", "square"])
def test_biformer_fused_matches_modular_fp32(drop_path, shape):
    """A BiFormer block (position conv, routing, routed attention, LePE, wo, MLP) as one node:
    3x5-token regions of a 6x10 map, topk 3 of 4 regions, so key regions are shared unevenly."""
    block = _biformer_block(drop_path).train()
    x = torch.randn(shape).contiguous(memory_format=torch.channels_last)
    assert block.fused_path_taken(x.permute(0, 2, 3, 1))
    out_m, gx_m, grads_m = _run(block, x, fused=False, nhwc=False)
    out_f, gx_f, grads_f = _run(block, x, fused=True, nhwc=False)
    assert out_f.shape == x.shape and out_f.dtype == out_m.dtype == torch.float32
    torch.testing.assert_close(out_f, out_m, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx_f, gx_m, rtol=1e-5, atol=1e-5)
    assert grads_f.keys() == grads_m.keys() and len(grads_m) == 16
    for name, g in grads_m.items():
        assert grads_f[name] is not None and grads_f[name].dtype == g.dtype, name
        torch.testing.assert_close(grads_f[name], g, rtol=1e-4, atol=1e-4, msg=name)


def test_biformer_fused_matches_modular_under_autocast():
    block = _biformer_block(0.2).train()
    x = torch.randn(2, 32, 6, 10)
    out_m, gx_m, grads_m = _run(block, x, fused=False, autocast_dtype=torch.float16, nhwc=False)
    out_f, gx_f, grads_f = _run(block, x, fused=True, autocast_dtype=torch.float16, nhwc=False)
    assert out_f.dtype == out_m.dtype
    torch.testing.assert_close(out_f, out_m, rtol=5e-3, atol=5e-3)
    torch.testing.assert_close(gx_f, gx_m, rtol=5e-3, atol=5e-3)
    for name, g in grads_m.items():
        assert grads_f[name].dtype == g.dtype == torch.float32, name
        torch.testing.assert_close(grads_f[name], g, rtol=2e-2, atol=2e-2 * g.abs().max().item(), msg=name)


@pytest.mark.parametrize("case", ["auto_pad padding", "gather backend", "auto backend on cpu", "global attention",
                                  "weights in another dtype"])
def test_biformer_fused_path_only_where_it_computes_the_same(case):
    block, x = _biformer_block(auto_pad=True), torch.randn(1, 6, 8, 32)
    assert block.fused_path_taken(x)
    if case == "auto_pad padding":
        x = torch.randn(1, 7, 8, 32)  # padded to 8x8 by the module
    elif case == "gather backend":
        block.attn.backend = "gather"
    elif case == "auto backend on cpu":
        block.attn.backend = "auto"
    elif case == "global attention":  # stage 4: AttentionLePE has no fused form
        block.attn = AttentionLePE(32, 2)
    elif case == "weights in another dtype":
        block.pos_embed.double()
    assert not block.fused_path_taken(x)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_biformer_block_scripts():
    block = _biformer_block().eval()
    x = torch.randn(1, 32, 6, 8)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.script(block)(x), block(x), rtol=1e-5, atol=1e-5)


def test_layer_norm_backward_adds_the_residual_gradient():
    torch.manual_seed(0)
    x, dy, res = torch.randn(37, 60), torch.randn(37, 60), torch.randn(37, 60)
    w, b = torch.randn(60), torch.randn(60)
    _, rows, stats = layer_norm_forward(x, w, b, 1e-5, torch.float32)
    dx, dw, db = layer_norm_backward(dy, rows, w, stats, x.shape, b.dtype)
    dx_r, dw_r, db_r = layer_norm_backward(dy, rows, w, stats, x.shape, b.dtype, grad_residual=res)
    torch.testing.assert_close(dx_r, dx + res)
    torch.testing.assert_close((dw_r, db_r), (dw, db))
    with pytest.raises(ValueError, match="grad_residual must be a contiguous"):
        layer_norm_backward(dy, rows, w, stats, x.shape, b.dtype, grad_residual=res.t().contiguous().t())


def test_block_graphs_are_used_only_where_they_compute_the_same(monkeypatch):
    """CUDA graphs of the fused block (tested on CUDA in test_gpu.py): only for CUDA inputs in grad
    mode, outside a stream capture and saved-tensor hooks, for attention known to capture (not yet
    BiFormer's), and not when switched off."""
    import types

    from visattn.layers.graphed_block import graphs_usable

    block = _block()
    cuda_x = types.SimpleNamespace(is_cuda=True)  # what the predicate reads of its input
    capturing = [False]  # no CUDA here to ask
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    assert graphs_usable(block, cuda_x)
    assert not graphs_usable(block, torch.zeros(1, 8, 8, 32))  # CPU
    with torch.no_grad():
        assert not graphs_usable(block, cuda_x)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):  # checkpointing, offloading
        assert not graphs_usable(block, cuda_x)
    capturing[0] = True  # a whole-step graph being captured
    assert not graphs_usable(block, cuda_x)
    capturing[0] = False
    monkeypatch.setenv("VISATTN_BLOCK_GRAPHS", "0")
    assert not graphs_usable(block, cuda_x)
    monkeypatch.delenv("VISATTN_BLOCK_GRAPHS")
    block.cuda_graphs = False
    assert not graphs_usable(block, cuda_x)
    assert not graphs_usable(_biformer_block(), cuda_x)  # its routed ops are not yet tested under capture
