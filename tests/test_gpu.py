"""GPU checks (marked ``gpu``, deselected by default; run with ``-m gpu`` on a CUDA machine)."""
import pytest
import timm
import torch

import visattn
from golden_data import load_golden

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _cuda_fp32():
    if not torch.cuda.is_available():
        pytest.fail("the gpu tests need CUDA")
    # The goldens are exact fp32: keep TF32 off for convs and matmuls.
    conv, mm = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = conv, mm


@pytest.mark.parametrize("name", ["nat", "dinat", "dinat_s", "dinat_isotropic", "vitrpb", "dinat_mm"])
def test_golden_on_cuda(name):
    meta, sd, io = load_golden(name)
    model = visattn.from_official(meta, sd).cuda()
    with torch.no_grad():
        out = model(io["input"].cuda())
    outs = out if isinstance(out, (list, tuple)) else [out]
    refs = [io[f"output.{i}"] for i in range(len(outs))] if isinstance(out, (list, tuple)) else [io["output"]]
    for o, r in zip(outs, refs):
        torch.testing.assert_close(o.cpu(), r, rtol=0, atol=meta["recommended_atol"])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reference_half_precision_on_cuda(dtype):
    q, k, v = torch.randn(3, 2, 40, 33, 4, 32, device="cuda").unbind(0)
    rpb = torch.randn(4, 13, 13, device="cuda")
    ref = visattn.kernels.na2d(q, k, v, 7, (2, 3), rpb=rpb)
    cpu = visattn.kernels.na2d(q.cpu(), k.cpu(), v.cpu(), 7, (2, 3), rpb=rpb.cpu())
    torch.testing.assert_close(ref.cpu(), cpu, rtol=1e-5, atol=1e-5)
    half = visattn.kernels.na2d(q.to(dtype), k.to(dtype), v.to(dtype), 7, (2, 3), rpb=rpb.to(dtype))
    assert half.dtype == dtype
    torch.testing.assert_close(half.float(), ref, rtol=2e-2, atol=2e-2)


def test_training_step_bf16_autocast():
    model = timm.create_model("visattn_dinat_t", num_classes=10).cuda().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = torch.randn(8, 3, 224, 224, device="cuda"), torch.randint(0, 10, (8,), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    opt.step()
