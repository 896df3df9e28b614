"""Loaders for the golden reference data computed with the official code (``../shared/golden``)."""
import json
import os
from pathlib import Path
from typing import Dict, Tuple

import torch
from safetensors.torch import load_file

GOLDEN_DIR = Path(os.environ.get("VISATTN_GOLDEN_DIR", Path(__file__).resolve().parents[2] / "shared" / "golden"))


def load_golden(name: str) -> Tuple[dict, Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """``(meta, official_state_dict, io)`` of a golden case; fails (never skips) if it is absent."""
    meta_path = GOLDEN_DIR / f"{name}.json"
    assert meta_path.exists(), f"golden data missing: {meta_path} (set VISATTN_GOLDEN_DIR)"
    meta = json.loads(meta_path.read_text())
    sd_path = GOLDEN_DIR / f"{name}.safetensors"  # op-level cases have inputs/outputs only
    state_dict = load_file(str(sd_path)) if sd_path.exists() else {}
    return meta, state_dict, load_file(str(GOLDEN_DIR / f"{name}.io.safetensors"))


def load_manifest(name: str) -> dict:
    path = GOLDEN_DIR / "manifests" / f"{name}.json"
    assert path.exists(), f"manifest missing: {path} (set VISATTN_GOLDEN_DIR)"
    return json.loads(path.read_text())


def manifest_names(repo_substring: str):
    """Names of the manifests whose official repository contains ``repo_substring``."""
    names = []
    for path in sorted((GOLDEN_DIR / "manifests").glob("*.json")):
        if repo_substring in json.loads(path.read_text()).get("official_repo", ""):
            names.append(path.stem)
    return names
