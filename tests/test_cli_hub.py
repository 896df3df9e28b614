"""The ``visattn`` command line, torch.hub entry points, the profiling helpers and README truth."""
import re
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
    assert len(names) == 23
    for name in names:
        assert re.search(rf"^{name}\s", out, re.M), name
    assert "dinat_large_384_11x11" in out


def test_info_prints_input_size_and_strides(capsys):
    assert cli.main(["info", "visattn_nat_t", "--no-gmacs"]) == 0
    out = capsys.readouterr().out
    assert "input size: (3, 224, 224)" in out
    assert "feature strides: [4, 8, 16, 32]" in out
    assert "official: nat_tiny" in out


def test_unknown_model_suggests_close_match(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["info", "visattn_nat_tt"])
    assert exit_info.value.code == 2
    assert "did you mean visattn_nat_t" in capsys.readouterr().err


def test_hub_entry_points():
    hub_names = [n for n in dir(__import__("hubconf")) if n.startswith("visattn_")]
    assert sorted(hub_names) == profile.list_visattn_models()
    model = torch.hub.load(str(REPO), "visattn_nat_m", source="local", pretrained=False, num_classes=10)
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 10)


def test_counts_match_official_numbers():
    """Params are exact; GMACs within 2% of the official fvcore MAC counts (nat_mini 2.7, vitrpb_small 4.6)."""
    model = timm.create_model("visattn_nat_m")
    assert profile.count_params(model) == 19_984_174
    assert profile.count_gmacs(model, (3, 224, 224)) == pytest.approx(2.7, rel=0.02)
    assert profile.count_gmacs(timm.create_model("visattn_vitrpb_s"), (3, 224, 224)) == pytest.approx(4.6, rel=0.02)


def test_demo_runs_on_a_real_photo():
    (row,) = profile.run_demo(["visattn_nat_m"])
    assert row["output_shape"] == (1, 1000) and row["ms"] > 0


def test_readme_lists_every_model_and_its_official_name():
    readme = (REPO / "README.md").read_text()
    for name in profile.list_visattn_models():
        official = profile.official_name(timm.create_model(name, pretrained=False).pretrained_cfg)
        assert re.search(rf"\| `{name}` \| `{official}` \|", readme), name


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    assert "<!-- test-command -->" in readme
    assert "README.md" in (REPO / ".ci" / "run").read_text()
