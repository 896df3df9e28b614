"""torch.hub entry points: one per registered ``visattn_*`` model, generated at import.

    torch.hub.load("path/to/visattn", "visattn_nat_m", source="local", pretrained=False, num_classes=10)

Each entry point is ``name(pretrained=False, **kwargs)`` and forwards to ``timm.create_model``;
``pretrained=True`` downloads the official checkpoint named in the model's pretrained cfg.
"""
dependencies = ["torch", "timm", "safetensors"]

# torch.hub lists every public callable of this module as an entry point, so only modules
# (not callable) and underscore names are imported or defined besides the generated functions.
import typing as _typing  # noqa: E402

import timm  # noqa: E402
import torch  # noqa: E402

from visattn import profile as _profile  # noqa: E402  (importing visattn registers the models)


def _entrypoint(name: str) -> _typing.Callable[..., torch.nn.Module]:
    cfg = timm.models.get_pretrained_cfg(name)
    official = _profile.official_name(cfg.to_dict()) if cfg is not None else ""

    def entrypoint(pretrained: bool = False, **kwargs: _typing.Any) -> torch.nn.Module:
        return timm.create_model(name, pretrained=pretrained, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__doc__ = (
        f"{name}{f' (official {official})' if official else ''}: "
        f"``timm.create_model({name!r}, pretrained=pretrained, **kwargs)``.\n\n"
        "pretrained: load the official weights (default tag of the pretrained cfg).\n"
        "kwargs: any timm.create_model argument, e.g. num_classes, features_only, pretrained_cfg_overlay."
    )
    return entrypoint


for _name in timm.list_models("visattn_*"):
    globals()[_name] = _entrypoint(_name)
del _name
