"""``import visattn.kernels`` works from a source checkout, from the installed package (editable in
CI) and from a wheel, including the case where a checkout's ``./visattn`` shadows the install."""
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROBE = "import visattn, visattn.kernels as k; print(visattn.__file__); print(k.na2d.__module__)"


def _probe(cwd: Path, env_path: str = "") -> str:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": env_path}
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=cwd, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_source_checkout_root():
    assert _probe(REPO).splitlines() == [str(REPO / "visattn" / "__init__.py"), "visattn.kernels.na"]


def test_installed_package_outside_checkout(tmp_path):
    assert "visattn.kernels.na" in _probe(tmp_path)


def test_wheel(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(REPO)],
        check=True, capture_output=True,
    )
    wheel = next(tmp_path.glob("visattn-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "visattn/kernels/na.py" in names and "visattn/kernels/reference.py" in names
    assert not any(n.startswith("kernels/") for n in names), "no top-level 'kernels' module may leak"
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    assert _probe(tmp_path, str(site)).splitlines()[0] == str(site / "visattn" / "__init__.py")
    # From the checkout root, ./visattn shadows the installed copy; its kernels link must resolve.
    assert "visattn.kernels.na" in _probe(REPO, str(site))
