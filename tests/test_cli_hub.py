"""The ``visattn`` command line, torch.hub entry points, the profiling helpers and README truth."""
import importlib.util
import re
import sys
from pathlib import Path

import pytest
import timm
import torch

from visattn import cli, profile

REPO = Path(__file__).resolve().parents[1]


def test_list_prints_every_model(capsys):
    assert cli.main(["list", "--no-gmacs"]) == 0
    out = capsys.readouterr().out
    names = profile.list_visattn_models()
    assert "visattn_nat_t" in names and "visattn_dinat_l_384" in names
    for name in names:
        assert re.search(rf"^{name}\s", out, re.M), name
    assert re.search(r"^visattn_dinat_l_384_k11\s+dinat_large_384_11x11\s+201\.14\s", out, re.M)


def test_list_filter_and_gmacs(capsys):
    assert cli.main(["list", "--filter", "visattn_nat_[mt]"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["model", "official", "params", "(M)", "GMACs", "input"]
    assert [line.split() for line in lines[2:]] == [
        ["visattn_nat_m", "nat_mini", "19.98", "2.69", "224x224"],
        ["visattn_nat_t", "nat_tiny", "27.90", "4.30", "224x224"],
    ]


def test_info_of_a_model_without_released_weights(capsys):
    assert cli.main(["info", "visattn_tcsr_b_x4"]) == 0
    out = capsys.readouterr().out
    assert "pretrained tags: none (no released weights)" in out
    assert "pretrained_cfg (visattn_tcsr_b_x4):" in out


def test_info_prints_input_size_and_strides(capsys):
    assert cli.main(["info", "visattn_nat_t"]) == 0
    out = capsys.readouterr().out
    assert "input size: (3, 224, 224)" in out
    assert "feature strides: [4, 8, 16, 32]" in out
    assert "feature channels: [64, 128, 256, 512]" in out
    assert "official name: nat_tiny" in out
    assert "params: 27,901,582" in out
    assert '  url: "https://shi-labs.com/projects/nat/checkpoints/CLS/nat_tiny.pth"' in out


@pytest.mark.parametrize("argv, suggestion", [
    (["info", "visattn_nat_tt"], "visattn_nat_t"),
    (["info", "nat_tiny"], "visattn_nat_t"),  # an official name
    (["demo", "--models", "visattn_dinat_l384"], "visattn_dinat_l_384"),
    (["list", "--filter", "visattn_vitrpb_ss"], "visattn_vitrpb_s"),
])
def test_unknown_model_exits_2_with_close_match(capsys, argv, suggestion):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("visattn: error: no visattn model matches")
    assert re.search(rf"did you mean {suggestion}\b", err), err


def _import_hubconf():
    """hubconf.py imported the way torch.hub does: repo root on sys.path, module from its file."""
    sys.path.insert(0, str(REPO))
    try:
        spec = importlib.util.spec_from_file_location("hubconf", REPO / "hubconf.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(REPO))
    return module


def test_hub_entry_points():
    hub = _import_hubconf()
    # torch.hub's entry points are the module's public callables.
    entry_points = sorted(n for n in dir(hub) if callable(getattr(hub, n)) and not n.startswith("_"))
    assert entry_points == profile.list_visattn_models()
    assert hub.dependencies == ["torch", "timm", "safetensors"]
    assert "nat_mini" in hub.visattn_nat_m.__doc__
    model = torch.hub.load(str(REPO), "visattn_nat_m", source="local", pretrained=False, num_classes=10)
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 10)


def test_counts_match_official_numbers():
    """Params exact; GMACs within 2% of the official fvcore MAC counts (CPU model and meta summary)."""
    model = timm.create_model("visattn_nat_m")
    assert profile.count_params(model) == 19_984_174
    assert profile.count_gmacs(model, (3, 224, 224)) == pytest.approx(2.7, rel=0.02)
    assert model.training, "count_gmacs must restore the training mode"
    for name, official in [("visattn_vitrpb_s", 4.6), ("visattn_dinats_t", 4.5), ("visattn_nat_iso_s", 4.3)]:
        assert profile.model_summary(name)["gmacs"] == pytest.approx(official, rel=0.02), name


def test_demo_runs_on_a_real_photo():
    (row,) = profile.run_demo(["visattn_nat_m"])
    assert row["name"] == "visattn_nat_m"
    assert row["output_shape"] == (1, 1000)
    assert row["params_m"] == 19.98 and row["gmacs"] == pytest.approx(2.69, abs=0.01)
    assert row["ms"] > 0


def test_format_table_aligns_columns():
    rows = [dict(model="a", ms=1.5), dict(model="bbb", ms=12.25)]
    assert profile.format_table(rows, ["model", "ms"]).splitlines() == [
        "model     ms",
        "-----  -----",
        "a        1.5",
        "bbb    12.25",
    ]


def test_readme_table_matches_the_models():
    readme = (REPO / "README.md").read_text()
    for name in profile.list_visattn_models():
        s = profile.model_summary(name, gmacs=False)
        assert re.search(rf"\| `{name}` \| `{s['official']}` \| {s['params_m']:.1f} \|", readme), name


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    assert "<!-- test-command -->" in readme
    assert "README.md" in (REPO / ".ci" / "run").read_text()
