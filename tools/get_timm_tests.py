"""Fetch timm's ``tests/test_models.py`` for the installed timm into ``tests/timm_suite/``.

It comes from timm's source distribution on the package index (the same version as the installed
timm, so its imports match); it is never committed to this repository.
"""
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import timm

DEST = Path(__file__).resolve().parents[1] / "tests" / "timm_suite" / "test_models.py"


def main() -> None:
    version = timm.__version__
    stamp = DEST.with_suffix(".version")
    if DEST.exists() and stamp.exists() and stamp.read_text().strip() == version:
        print(f"{DEST} is timm {version}'s already")
        return
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", f"timm=={version}", "-d", tmp],
            check=True,
        )
        sdist = next(Path(tmp).glob("timm-*.tar.gz"))
        with tarfile.open(sdist) as tar:
            member = tar.getmember(f"timm-{version}/tests/test_models.py")
            DEST.write_bytes(tar.extractfile(member).read())
    stamp.write_text(version)
    print(f"wrote {DEST} from timm {version}")


if __name__ == "__main__":
    main()
