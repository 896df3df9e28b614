"""The benchmark harness: its flex_attention competitor computes the same op, and the commands
refuse clearly without CUDA (the timings themselves run on the GPU machine)."""
import pytest
import torch

from visattn.bench.na import SHAPES, NAShape, flex_mods
from visattn.cli import main
from visattn.kernels import na2d

flex_attention = pytest.importorskip("torch.nn.attention.flex_attention")


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("shape", [
    NAShape("ragged-dilated", 1, 2, 13, 11, 16, 5, dilation=2),
    NAShape("window", 1, 2, 16, 16, 16, 4, stride=4),
    NAShape("strided", 1, 2, 15, 17, 16, 5, stride=3),
], ids=lambda s: s.name)
def test_flex_competitor_matches_reference(shape):
    """The block mask and rpb score_mod given to flex_attention express exactly visattn's op."""
    q, k, v = torch.randn(3, 1, shape.height, shape.width, shape.heads, shape.head_dim).unbind(0)
    rpb = torch.randn(shape.heads, 2 * shape.kernel_size - 1, 2 * shape.kernel_size - 1)
    tokens = shape.height * shape.width
    heads_first = [t.permute(0, 3, 1, 2, 4).reshape(1, shape.heads, tokens, shape.head_dim) for t in (q, k, v)]
    mask_mod, score_mod = flex_mods(shape, rpb)
    block_mask = flex_attention.create_block_mask(mask_mod, None, None, tokens, tokens, device="cpu", BLOCK_SIZE=16)
    out = flex_attention.flex_attention(*heads_first, score_mod=score_mod, block_mask=block_mask)
    out = out.reshape(1, shape.heads, shape.height, shape.width, shape.head_dim).permute(0, 2, 3, 1, 4)
    ref = na2d(q, k, v, shape.kernel_size, shape.dilation, shape.stride, rpb=rpb, backend="reference")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_issue_shapes_are_benchmarked():
    names = {s.name for s in SHAPES}
    assert {"nat-t-s1", "dinat-t-s1-d8", "nat-t-s3", "dinat-l384-s1", "k13-128-d64", "hat-window16"} <= names


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without CUDA")
@pytest.mark.parametrize("which", ["na", "routed", "model"])
def test_bench_without_cuda_says_why(which):
    with pytest.raises(SystemExit, match="need a CUDA device"):
        main(["bench", which])
