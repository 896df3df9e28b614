"""Helpers shared by the model families."""
from typing import List

import torch
from torch.fx._symbolic_trace import is_fx_symbolic_tracing


@torch.jit.ignore
def check_image_batch(x: torch.Tensor, in_chans: int, model_name: str) -> None:
    """Raise a ValueError unless ``x`` is a non-empty ``[B, in_chans, H, W]`` batch.

    Skipped while torch.fx traces the model (shapes are symbolic then).
    """
    if is_fx_symbolic_tracing():
        return
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{model_name} expects an image batch [B, {in_chans}, H, W], got {got}")
    if x.shape[1] != in_chans:
        raise ValueError(f"{model_name} expects {in_chans} input channels [B, {in_chans}, H, W], got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{model_name} got an empty batch (shape {tuple(x.shape)}); expected B >= 1")


def drop_path_schedule(drop_path_rate: float, num_blocks: int) -> List[float]:
    """Stochastic depth rising linearly from 0 to ``drop_path_rate`` over the blocks.

    Plain Python so models can be built under a ``torch.device('meta')`` context.
    """
    return [drop_path_rate * i / max(1, num_blocks - 1) for i in range(num_blocks)]
