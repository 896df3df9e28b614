"""The routed-attention op: its reference against dense masked attention, deterministic routing,
and bad input."""
import pytest
import torch

from visattn.kernels import region_topk, routed_attention


def _dense_masked(q, k, v, index, scale):
    """The same function as full attention over all tokens with a region mask (independent path)."""
    B, Rq, Tq, heads, D = q.shape
    Rk, Tk = k.shape[1], k.shape[2]
    allowed = torch.zeros(B, Rq, Rk, dtype=torch.bool)
    allowed.scatter_(2, index, True)
    mask = allowed[:, :, None, :, None].expand(B, Rq, Tq, Rk, Tk).reshape(B, 1, Rq * Tq, Rk * Tk)
    qf = q.reshape(B, Rq * Tq, heads, D).transpose(1, 2)
    kf = k.reshape(B, Rk * Tk, heads, D).transpose(1, 2)
    vf = v.reshape(B, Rk * Tk, heads, v.shape[-1]).transpose(1, 2)
    logits = (qf @ kf.transpose(-1, -2)) * scale
    out = logits.masked_fill(~mask, float("-inf")).softmax(-1) @ vf
    return out.transpose(1, 2).reshape(B, Rq, Tq, heads, v.shape[-1])


@pytest.mark.parametrize("Rq, Rk, Tq, Tk, topk, D, Dv", [(9, 9, 4, 4, 3, 8, 8), (6, 10, 5, 3, 10, 16, 12), (4, 4, 1, 1, 1, 4, 4)])
def test_reference_matches_dense_masked_attention(Rq, Rk, Tq, Tk, topk, D, Dv):
    torch.manual_seed(0)
    q = torch.randn(2, Rq, Tq, 3, D, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, Rk, Tk, 3, D, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, Rk, Tk, 3, Dv, dtype=torch.float64, requires_grad=True)
    index = torch.stack([torch.randperm(Rk)[:topk] for _ in range(2 * Rq)]).view(2, Rq, topk)
    out = routed_attention(q, k, v, index, scale=0.3)
    ref = _dense_masked(q, k, v, index, 0.3)
    torch.testing.assert_close(out, ref)
    grad = torch.randn_like(out)
    for g, r in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
        torch.testing.assert_close(g, r)


def test_half_precision_is_computed_in_fp32():
    q, k, v = (torch.randn(1, 4, 4, 2, 8) for _ in range(3))
    index = region_topk(q.mean(2).flatten(2), k.mean(2).flatten(2), 2)
    out = routed_attention(q.half(), k.half(), v.half(), index)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), routed_attention(q, k, v, index), rtol=2e-3, atol=2e-3)


def test_region_topk_orders_and_breaks_ties_by_lower_index():
    q_desc = torch.tensor([[[1.0, 0.0]]])
    k_desc = torch.tensor([[[0.5, 0.0], [2.0, 0.0], [0.5, 1.0], [0.5, 0.0]]])
    assert region_topk(q_desc, k_desc, 3).tolist() == [[[1, 0, 2]]]  # 0, 2 and 3 tie: lower index first


@pytest.mark.parametrize("call, match", [
    (lambda q, k, v, i: routed_attention(q[0], k, v, i), r"q must be a 5-D tensor \[B, regions"),
    (lambda q, k, v, i: routed_attention(q, k, v[:, :3], i), r"k and v must agree"),
    (lambda q, k, v, i: routed_attention(q, k, v, i.int()), r"index must be int64 \[B, query_regions, topk\]"),
    (lambda q, k, v, i: routed_attention(q, k.double(), v, i), r"must share one floating dtype"),
    (lambda q, k, v, i: routed_attention(q, k, v, i, backend="cuda"), r"unknown backend 'cuda'"),
    (lambda q, k, v, i: region_topk(q.mean(2).flatten(2), k.mean(2).flatten(2), 5), r"topk must be in \[1, 4\]"),
])
def test_bad_input(call, match):
    q, k, v = (torch.randn(1, 4, 4, 2, 8) for _ in range(3))
    index = torch.zeros(1, 4, 2, dtype=torch.int64)
    with pytest.raises(ValueError, match=match):
        call(q, k, v, index)
