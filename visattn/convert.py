"""Checkpoint plumbing shared by every family: unwrapping released checkpoints, recognising which
family a state dict belongs to, strict loading with a readable report, and ``from_official``."""
from __future__ import annotations

import re
import warnings
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn

# Wrappers used by released checkpoints, in order of preference (EMA weights first).
_WRAPPER_KEYS = ("params_ema", "params", "state_dict_ema", "model_ema", "model", "state_dict")

# Key patterns that identify the official layout of each family (checked in order).
_FAMILY_SIGNATURES = (
    ("NAT / DiNAT (official hierarchical layout)", r"^levels\.\d+\.blocks\.\d+\.attn\.rpb$"),
    ("DiNAT_s (official Swin-style layout)", r"^layers\.\d+\.blocks\.\d+\.attn\.rpb$"),
    ("ViT-rpb (official isotropic layout)", r"^layers\.\d+\.attn\.relative_position_index$"),
    ("NAT / DiNAT isotropic (official layout)", r"^layers\.\d+\.attn\.rpb$"),
    ("visattn NAT family", r"^stages\.\d+\.blocks\.\d+\.attn\.rpb$|^blocks\.\d+\.attn\.rpb$"),
    ("BiFormer", r"^stages\.\d+\.\d+\.attn\.(qkv|lepe|wo)\.|\.attn\.lepe\."),
    ("visattn HAT", r"^groups\.\d+\.blocks\.\d+\.attn\.rpb$|^groups\.\d+\.overlap_attn\.attn\.rpb$"),
    ("visattn HAN", r"^(layer_attn|channel_spatial_attn)\.|^layer_fuse\."),
    ("visattn RCAN", r"^body\.\d+\.blocks\.\d+\.attn\.fc1\.weight$"),
    ("HAT", r"^layers\.\d+\.residual_group\.blocks\.\d+\.attn\.relative_position_bias_table$|\.conv_block\.cab\."),
    ("HAN", r"^(la|csa)\.|^last_conv\."),
    ("RCAN", r"^body\.\d+\.body\.\d+\.body\.\d+\.conv_du\."),
    ("PAN", r"^SCPA_trunk\.|\.SCPA_trunk\."),
    ("A2N", r"^AAB_trunk\.|\.AAB_trunk\.|\.ADM\."),
    ("LeViT", r"\.attention_biases$"),
    ("HaloNet", r"\.self_attn\.(q|kv)\.weight$"),
    ("ResNeSt", r"\.conv2\.fc1\.weight$|\.rsoftmax"),
    ("ViT", r"^pos_embed$|^cls_token$"),
)


class CheckpointMismatchError(ValueError):
    """A state dict that does not fit a model: lists missing, unexpected and mis-shaped keys."""


def guess_family(state_dict: Mapping[str, torch.Tensor]) -> Optional[str]:
    """Name of the model family whose key layout ``state_dict`` follows, or None if unknown."""
    for family, pattern in _FAMILY_SIGNATURES:
        regex = re.compile(pattern)
        if any(regex.search(key) for key in state_dict):
            return family
    return None


def unwrap_checkpoint(checkpoint: Mapping, keep_prefix: str = "backbone.") -> Dict[str, torch.Tensor]:
    """Return the flat state dict inside a released checkpoint.

    Accepts ``{'params_ema' | 'params' | 'model' | 'state_dict' ...: sd}`` wrappers (EMA weights
    preferred) and strips ``module.`` prefixes. If the keys carry ``keep_prefix`` (a backbone inside
    a full detector/segmentor checkpoint) only those are kept, with a warning naming how many
    other keys were left out.
    """
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"expected a checkpoint dict (state dict or a wrapper of one), got {type(checkpoint).__name__}")
    sd = checkpoint
    for key in _WRAPPER_KEYS:
        if isinstance(sd.get(key), Mapping):
            sd = sd[key]
            break
    sd = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in sd.items()}
    if keep_prefix and any(k.startswith(keep_prefix) for k in sd):
        dropped = [k for k in sd if not k.startswith(keep_prefix)]
        if dropped:
            warnings.warn(
                f"checkpoint holds a full model; loading its {keep_prefix!r} weights and leaving out "
                f"{len(dropped)} other keys (e.g. {dropped[:3]})"
            )
        sd = {k[len(keep_prefix):]: v for k, v in sd.items() if k.startswith(keep_prefix)}
    return dict(sd)


def _listing(title: str, keys: List[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit]) + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")
    return f"{title} ({len(keys)}): {shown}"


def rename_key(key: str, rules: Sequence[Tuple[str, str]]) -> str:
    """``key`` renamed by the first ``(pattern, replacement)`` regex rule that matches it (unchanged if none does)."""
    for pattern, repl in rules:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    return key


def remap_keys(state_dict: Mapping[str, torch.Tensor], rules: Sequence[Tuple[str, str]]) -> Dict[str, torch.Tensor]:
    """The state dict with every key renamed by :func:`rename_key`."""
    return {rename_key(key, rules): value for key, value in state_dict.items()}


def check_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Raise :class:`CheckpointMismatchError` unless ``state_dict`` fits ``model`` exactly."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    misshaped = [
        f"{k} (checkpoint {tuple(state_dict[k].shape)}, model {tuple(expected[k].shape)})"
        for k in expected
        if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k].shape)
    ]
    if not (missing or unexpected or misshaped):
        return
    parts = [f"checkpoint does not fit {type(model).__name__}"]
    family = guess_family(state_dict)
    if family:
        parts.append(f"the checkpoint looks like: {family}")
    for title, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("mis-shaped keys", misshaped)):
        if keys:
            parts.append(_listing(title, keys))
    raise CheckpointMismatchError("; ".join(parts))


# ---------------------------------------------------------------------------------------------
# from_official

OfficialBuilder = Callable[[Mapping], nn.Module]
_OFFICIAL_BUILDERS: Dict[str, OfficialBuilder] = {}


def register_official(*class_ids: str) -> Callable[[OfficialBuilder], OfficialBuilder]:
    """Register ``builder(meta) -> model`` for official classes named like ``'classification/nat.py::NAT'``.

    The built model must have a ``checkpoint_filter_fn(state_dict, model)`` in its module, which
    maps official keys to visattn keys.
    """

    def wrap(builder: OfficialBuilder) -> OfficialBuilder:
        for class_id in class_ids:
            _OFFICIAL_BUILDERS[class_id] = builder
        return builder

    return wrap


def official_classes() -> List[str]:
    """Official class ids that :func:`from_official` can build."""
    import visattn.models  # noqa: F401  (registers the builders)

    return sorted(_OFFICIAL_BUILDERS)


def from_official(meta: Mapping, state_dict: Mapping) -> nn.Module:
    """Build the visattn model described by an official ``meta`` and load an official checkpoint.

    Args:
        meta: ``{'official_class': 'classification/dinat.py::DiNAT', 'constructor_kwargs': {...}}``
            as in ``shared/golden/*.json`` and the manifests.
        state_dict: an official checkpoint as released (flat or wrapped in ``model`` /
            ``state_dict`` / ``params_ema`` / ``params``; ``module.`` / ``backbone.`` prefixes).

    Returns:
        The visattn model with converted weights, in ``eval()`` mode.

    Raises:
        ValueError: unknown official class; :class:`CheckpointMismatchError` when a key is
        missing, unexpected or mis-shaped.
    """
    import ast
    import importlib
    import visattn.models  # noqa: F401  (registers the builders)

    class_id = str(meta.get("official_class", "")).split(" ")[0]
    if isinstance(meta.get("constructor_kwargs"), str):  # some manifests store the kwargs' Python repr
        meta = {**meta, "constructor_kwargs": ast.literal_eval(meta["constructor_kwargs"])}
    if class_id not in _OFFICIAL_BUILDERS:
        raise ValueError(f"unknown official class {class_id!r}; visattn builds: {official_classes()}")
    model = _OFFICIAL_BUILDERS[class_id](meta)
    family_module = importlib.import_module(type(model).__module__)
    sd = family_module.checkpoint_filter_fn(unwrap_checkpoint(state_dict), model)
    check_state_dict(model, sd)
    model.load_state_dict(sd, strict=True)
    return model.eval()
