"""torch.hub entry points: one per registered ``visattn_*`` model.

``torch.hub.load('path/to/visattn', 'visattn_nat_m', source='local', pretrained=False, num_classes=10)``
"""
dependencies = ["torch", "timm", "safetensors"]

import timm  # noqa: E402

import visattn  # noqa: E402,F401  (registers the models)


def _entrypoint(name: str):
    def create(pretrained: bool = False, **kwargs):
        return timm.create_model(name, pretrained=pretrained, **kwargs)

    create.__name__ = name
    create.__doc__ = f"{name}: `timm.create_model('{name}', pretrained, **kwargs)` (official weights when pretrained)."
    return create


for _name in timm.list_models("visattn_*"):
    globals()[_name] = _entrypoint(_name)
del _name
