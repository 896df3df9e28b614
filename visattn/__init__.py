"""visattn: a timm-compatible zoo of attention vision models on one fast kernel layer."""
from . import kernels, layers, models
from .convert import CheckpointMismatchError, from_official, guess_family, official_classes, unwrap_checkpoint

__version__ = "0.1.0"

__all__ = [
    "CheckpointMismatchError",
    "from_official",
    "guess_family",
    "kernels",
    "layers",
    "models",
    "official_classes",
    "unwrap_checkpoint",
]
