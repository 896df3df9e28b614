"""Run timm's own ``tests/test_models.py`` against every registered ``visattn_*`` model.

The test file is not part of this repository: ``tools/get_timm_tests.py`` extracts it from the
timm source distribution matching the installed timm (see the README's test command).

timm's file draws its model lists from ``timm.list_models`` at import time, so this conftest wraps
``list_models`` before that import: it returns visattn names only, adds visattn's NHWC-output /
token models to the "non-standard" pattern lists where timm's own swin/vit-style models sit, and
adds visattn's family modules to the ``forward_intermediates`` module allow-list.
Tests that do not take a model name from those lists (timm's own pretrained test nets) are
deselected in ``pytest_collection_modifyitems``.
"""
import fnmatch

import pytest
import timm

import visattn  # noqa: F401  (registers visattn_* models)

# visattn family modules that implement forward_intermediates / prune_intermediate_layers.
VISATTN_MODULES = ["nat", "biformer"]
# Models whose default-cfg checks follow timm's non-standard (token / NHWC-head) path: none yet;
# the NAT family pools NHWC maps like timm's swin and passes the standard checks.
VISATTN_NON_STD = []

_list_models = timm.list_models


def _as_list(value):
    if not value:
        return []
    return [value] if isinstance(value, str) else list(value)


def _visattn_list_models(filter="", module="", pretrained=False, exclude_filters="", *args, **kwargs):
    filters, excludes, modules = _as_list(filter), _as_list(exclude_filters), _as_list(module)
    if "vit_*" in filters:  # timm's NON_STD_FILTERS
        filters = filters + VISATTN_NON_STD
    if "vit_*" in excludes:
        excludes = excludes + VISATTN_NON_STD
    if len(modules) > 1:  # timm's FEAT_INTER_FILTERS module allow-list
        modules = modules + VISATTN_MODULES
    names = _list_models(filters, modules, pretrained, excludes, *args, **kwargs)
    return [n for n in names if fnmatch.fnmatch(n, "visattn_*")]


timm.list_models = _visattn_list_models


def pytest_configure(config):
    for marker in ("base", "forward", "backward", "cfg", "cfg_nonstd", "torchscript", "features", "fxforward", "fxbackward"):
        config.addinivalue_line("markers", f"{marker}: timm test_models.py marker")


# timm tests that cannot apply here, with the reason:
NOT_APPLICABLE = {
    # Download the pretrained_cfg URL (the official release); CI has no network. The same
    # assertions (pretrained load with in_chans=1 / num_classes=5 / num_classes=0, and features_only
    # on pretrained weights) run offline from local official-format files in tests/test_nat_models.py
    # (NAT-Mini) and tests/test_biformer_models.py (BiFormer-T).
    "test_model_load_pretrained": "needs network",
    "test_model_features_pretrained": "needs network",
}


# Variants over ~50M parameters take minutes per test on a 2-core CPU (timm's prune contract
# deep-copies and back-propagates the whole model per tap). They share code with the smaller
# variants of their architecture that CI runs, and are marked slow: run them with `-m slow`
# (on the GPU machine: TORCH_DEVICE=cuda).
HEAVY_MODELS = [
    "visattn_nat_b", "visattn_dinat_s", "visattn_dinat_b", "visattn_dinat_l*", "visattn_dinats_s", "visattn_dinats_b",
    "visattn_dinats_l*", "visattn_nat_iso_b", "visattn_dinat_iso_b", "visattn_vitrpb_b", "visattn_biformer_b",
]


# Super-resolution models map images to images: timm's classifier contract (num_classes,
# forward_features / pooled heads, reset_classifier, feature_info) does not apply to them, so only
# timm's forward / fx / torchscript tests run on them; tests/test_sr_*.py cover the rest.
SR_MODELS = ["visattn_rcan_*", "visattn_han_*", "visattn_hat_*", "visattn_pan_*", "visattn_a2n_*", "visattn_tcsr_*"]
SR_APPLICABLE = {"test_model_forward", "test_model_forward_fx", "test_model_forward_torchscript"}
# The full-size SR bodies (RCAN / HAN: 200 conv blocks, HAT) take 10-25 s per forward test on 2 cores;
# TCSR's neighborhood attention runs the reference backend on CPU (5-9 s a test): CI keeps TCSR-B x4.
HEAVY_MODELS += ["visattn_rcan_*", "visattn_han_*", "visattn_hat_*", "visattn_tcsr_l_*", "visattn_tcsr_b_x2",
                 "visattn_tcsr_b_x3"]


def _model_of(item):
    callspec = getattr(item, "callspec", None)
    name = callspec.params.get("model_name", "") if callspec else ""
    return name.split(".")[0] if isinstance(name, str) else ""


def pytest_collection_modifyitems(config, items):
    here = str(config.rootpath / "tests" / "timm_suite")
    keep, drop = [], []
    for item in items:
        in_suite = str(item.fspath).startswith(here)
        applicable = "visattn_" in item.nodeid and item.originalname not in NOT_APPLICABLE
        if any(fnmatch.fnmatch(_model_of(item), p) for p in SR_MODELS) and item.originalname not in SR_APPLICABLE:
            applicable = False
        (keep if not in_suite or applicable else drop).append(item)
        if in_suite and any(fnmatch.fnmatch(_model_of(item), p) for p in HEAVY_MODELS):
            item.add_marker(pytest.mark.slow)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
