"""The benchmark harness: its flex_attention competitor computes the same op, the official HAT
port of the SR benchmark reproduces the official output and visattn's HAT, the official BRA port of
the routed benchmark computes visattn's layer with the official weight layout, and the commands
refuse clearly without CUDA (the timings themselves run on the GPU machine)."""
import hashlib

import pytest
import timm
import torch

import visattn.models.hat  # noqa: F401  (registers the HAT models)
from visattn.bench.biformer_official_port import OfficialBRAPort
from visattn.bench.hat_official_port import OfficialHATPort, hyperparameters_of, official_state_dict
from visattn.bench.na import SHAPES, NAShape, flex_mods, summarize
from visattn.cli import main
from visattn.kernels import na2d
from visattn.layers import BiLevelRoutingAttention
from visattn.models.hat import HAT, checkpoint_filter_fn
from golden_data import load_golden, load_manifest

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


# The golden's reduced HAT (window 16, OCAB window 24) as HAT / OfficialHATPort arguments.
SMALL_HAT = dict(upscale=2, embed_dim=24, depths=(2, 2), num_heads=(2, 2), window_size=16, compress_ratio=3,
                 squeeze_factor=6, mlp_ratio=2.0)


def test_official_port_reproduces_the_official_golden():
    """Loaded with the official state dict, the port gives the official code's output; the index
    buffers it computes are the official bytes."""
    meta, sd, io = load_golden("hat")
    port = OfficialHATPort(**SMALL_HAT).eval()
    for key, entry in meta["omitted_state_dict_entries"].items():
        assert hashlib.sha256(getattr(port, key).numpy().tobytes()).hexdigest() == entry["sha256_of_raw_bytes"]
    port.load_state_dict({**sd, "relative_position_index_SA": port.relative_position_index_SA,
                          "relative_position_index_OCA": port.relative_position_index_OCA})
    with torch.no_grad():
        out = port(io["input"])
    torch.testing.assert_close(out, io["output"], rtol=0, atol=meta["recommended_atol"])


def _small_hat_and_port():
    """A float64 small HAT with every weight re-drawn (so rpb, CAB and OCAB all weigh in) and its port."""
    model = HAT(**SMALL_HAT).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model, OfficialHATPort.from_visattn(model)


def test_official_port_matches_visattn_hat():
    """32x40 pads to 32x48: 2x3 windows of 16, shifted blocks with the region mask, OCAB windows of
    24 reaching into the zero padding; float64, so any algorithmic difference shows."""
    model, port = _small_hat_and_port()
    x = torch.rand(1, 3, 32, 40, dtype=torch.float64)
    with torch.no_grad():
        ref, out = model(x), port(x)
    assert out.shape == (1, 3, 64, 80)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
    # The official converter reads the port's layout back into exactly visattn's weights.
    back = checkpoint_filter_fn(port.state_dict(), model)
    assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("key", ["layers.1.residual_group.blocks.1.attn.relative_position_bias_table",
                                 "layers.0.residual_group.overlap_attn.relative_position_bias_table"],
                         ids=["shifted-window", "ocab"])
def test_official_port_reads_its_own_tables(key):
    """Changing one row of an official table (for OCAB, the row its most negative index wraps
    around to) moves the port's output away from visattn's; visattn given the same official
    weights through its checkpoint converter agrees again."""
    model, port = _small_hat_and_port()
    x = torch.rand(1, 3, 32, 40, dtype=torch.float64)
    index = port.relative_position_index_OCA if "overlap" in key else port.relative_position_index_SA
    sd = port.state_dict()
    table = sd[key]
    table[int(index.min()) % table.shape[0]] += 3.0  # in place: the port's own parameter
    with torch.no_grad():
        before, out = model(x), port(x)
        assert (out - before).abs().max() > 1e-8
        model.load_state_dict(checkpoint_filter_fn(sd, model))
        torch.testing.assert_close(out, model(x), rtol=0, atol=1e-10)


@pytest.mark.parametrize("name, official", [("visattn_hat_s_x4", "HAT-S_SRx4"), ("visattn_hat_x4", "HAT_SRx4")])
def test_official_port_layout_of_benchmarked_models(name, official):
    """For the two benchmarked models, the port built from the visattn model's hyper-parameters has
    exactly the official state dict (keys in order, shapes), and so has the converted visattn one."""
    expected = [(k, list(shape)) for k, shape in load_manifest(official)["state_dict"]]
    with torch.device("meta"):
        model = timm.create_model(name)
        port = OfficialHATPort(**hyperparameters_of(model))
    assert [(k, list(v.shape)) for k, v in port.state_dict().items()] == expected
    assert sorted((k, list(v.shape)) for k, v in official_state_dict(model).items()) == sorted(expected)


@pytest.mark.parametrize("size, n_win, topk, auto_pad", [(14, 7, 4, False), (16, 4, 3, False), (13, 4, 2, True)])
def test_official_bra_port_matches_visattn_layer(size, n_win, topk, auto_pad):
    """The port (official op sequence, official ``torch.topk`` routing) equals visattn's layer on
    the reference backend (golden-checked inside the BiFormer models), padding included."""
    torch.manual_seed(0)
    layer = BiLevelRoutingAttention(32, 4, n_win, 32, topk, auto_pad=auto_pad, backend="reference")
    port = OfficialBRAPort.from_visattn(layer)
    x = torch.randn(2, size, size, 32, dtype=torch.float64)
    layer, port = layer.double(), port.double()
    torch.testing.assert_close(port(x), layer(x), rtol=1e-10, atol=1e-10)
    wrong = OfficialBRAPort.from_visattn(layer)
    wrong.topk = topk - 1  # one routed region fewer must show
    assert (wrong(x) - layer(x)).abs().max() > 1e-3


def test_official_bra_port_has_the_official_layout():
    """Keys and shapes of the port are those of an official BiFormer-S stage-2 block's ``attn``."""
    prefix = "stages.1.0.attn."
    expected = [(k[len(prefix):], list(s)) for k, s in load_manifest("biformer_small")["state_dict"] if k.startswith(prefix)]
    port = OfficialBRAPort(128, 4, 7, 128, 4)
    assert [(k, list(v.shape)) for k, v in port.state_dict().items()] == expected


def test_na_summary_puts_both_timings_against_the_roofline():
    """The forward's roofline ratio from one graph replay and from the per-call time of calls
    replayed back to back; rows without the per-call timing show neither of its columns."""
    row = {"shape": "s", "mode": "fwd", "ms": {"triton": 0.1}, "graph_ms": {"triton": 0.05}, "errors": {},
           "peak_bytes": {}, "roofline_ms": 0.0125, "per_call_graph_ms": {"triton": 0.04}}
    header, _, line = summarize([row]).splitlines()
    cell = lambda column: line[header.index(column):].split()[0]  # cells start under their column names
    assert cell("triton/roofline") == "4.00x"
    assert cell("triton per-call graph") == "0.0400" and cell("per-call/roofline") == "3.20x"
    del row["per_call_graph_ms"]
    assert "3.20x" not in summarize([row]) and "0.0400" not in summarize([row])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without CUDA")
@pytest.mark.parametrize("which", ["na", "routed", "model", "sr", "launch", "dwconv"])
def test_bench_without_cuda_says_why(which):
    with pytest.raises(SystemExit, match="need a CUDA device"):
        main(["bench", which])


def test_cli_imports_a_benchmark_only_to_run_it():
    """Building the parser (every command does) leaves the benchmark modules unimported; a
    benchmark's own options are parsed by its module's parser."""
    import subprocess
    import sys

    code = ("import sys; from visattn.cli import build_parser; build_parser().parse_args(['list']); "
            "print(sorted(m for m in sys.modules if m.startswith('visattn.bench')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    with pytest.raises(SystemExit):
        main(["bench", "model", "--timings", "sometimes"])


def test_sass_tool_counts_the_forward_loop():
    """tools/sass_na.py compiles a kernel for sm_90 without a GPU, as JITFunction.run would specialize
    it, and finds its key-row loop in the disassembly (matrix products and exp2 inside). It runs in
    a process without TRITON_INTERPRET, whose kernels cannot be compiled."""
    import os
    import subprocess
    import sys

    import triton

    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")):
        pytest.skip("this triton build ships no nvdisasm")
    root = os.path.join(os.path.dirname(__file__), "..")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, os.path.join(root, "tools", "sass_na.py"), "--kernels", "fwd"],
                            capture_output=True, text=True, env=env, cwd=root, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    blocks = result.stdout.split("fwd ")[1:]
    assert len(blocks) == 2, result.stdout  # with and without rpb
    for block in blocks:
        loops = [line for line in block.splitlines() if line.strip().startswith("loop of")]
        assert len(loops) == 1 and "HMMA" in loops[0] and "MUFU" in loops[0], result.stdout


def test_bench_model_reports_a_model_out_of_memory_and_times_the_rest(monkeypatch, capsys):
    """A model that does not fit beside the others (the reference backend at batch 128 on an 80 GB
    card) is reported with the way to time it alone; the other models are still timed."""
    from visattn.bench import model as bench_model

    def prepared(spec, batch, image_size, optimizer, timing):
        if spec.endswith("@reference"):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 86.00 MiB.")
        return bench_model.PreparedStep(lambda: None, 1.5, lambda: None)

    monkeypatch.setattr(bench_model, "require_cuda", lambda: None)
    monkeypatch.setattr(bench_model, "device_name", lambda: "test device")
    monkeypatch.setattr(bench_model, "prepared_step", prepared)
    monkeypatch.setattr(bench_model, "_step_ms", lambda run, steps: [40.0] * steps)
    specs = ["visattn_dinat_t@triton", "visattn_dinat_t@reference", "swin_tiny_patch4_window7_224"]
    payload = bench_model.run(specs, batch=128, image_size=224, out_dir=None, steps=2, timings=["eager"], rounds=2)
    assert list(payload["results"]) == specs
    assert payload["results"]["visattn_dinat_t@triton"]["eager"]["ms_per_step"] == 40.0
    assert payload["results"]["swin_tiny_patch4_window7_224"]["eager"]["ms_per_step"] == 40.0
    error = payload["results"]["visattn_dinat_t@reference"]["eager"]["error"]
    assert "out of memory" in error and "--models visattn_dinat_t@reference" in error
    printed = capsys.readouterr().out
    assert "not run: visattn_dinat_t@reference (eager)" in printed


def test_bench_na_keeps_the_finished_shapes_of_a_run_stopped_partway(monkeypatch, tmp_path, capsys):
    """``na.json`` holds every shape finished so far, with its tuned launches printed, so a run
    stopped at a time limit (as on the GPU machine) keeps what it measured."""
    import json

    from visattn.bench import na as bench_na

    def fake_shape(shape, dtype, bandwidth, competitors):
        if shape.name != "nat-t-s1":
            raise KeyboardInterrupt  # what a time limit's signal leaves of the second shape
        return [{"shape": shape.name, "mode": mode, "ms": {"triton": 0.05}, "errors": {}, "peak_bytes": {},
                 "roofline_ms": 0.017 if mode == "fwd" else None, "io_bytes": 1,
                 "tuned": {"fwd rpb": "1x4x8/r2/w1/s3/t"} if mode == "fwd" else {}}
                for mode in ("fwd", "fwd+bwd")]

    monkeypatch.setattr(bench_na, "require_cuda", lambda: None)
    monkeypatch.setattr(bench_na, "copy_bandwidth", lambda: 3.0e12)
    monkeypatch.setattr(bench_na, "device_name", lambda: "test device")
    monkeypatch.setattr(bench_na, "bench_shape", fake_shape)
    with pytest.raises(KeyboardInterrupt):
        bench_na.run(bench_na.SHAPES[:2], ["triton"], str(tmp_path))
    saved = json.loads((tmp_path / "na.json").read_text())
    assert [s["name"] for s in saved["shapes"]] == ["nat-t-s1"]
    assert [(r["shape"], r["mode"]) for r in saved["rows"]] == [("nat-t-s1", "fwd"), ("nat-t-s1", "fwd+bwd")]
    assert (tmp_path / "na.png").exists()
    assert "tuned (nat-t-s1 fwd): fwd rpb 1x4x8/r2/w1/s3/t" in capsys.readouterr().out
