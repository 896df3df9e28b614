"""Helpers shared by the model families."""
from typing import Callable, List, Optional, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import trunc_normal_
from timm.models._features import feature_take_indices
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


def trunk_intermediates(
    x: torch.Tensor,
    stem: nn.Module,
    trunk: nn.Sequential,
    indices: Optional[Union[int, List[int]]],
    stop_early: bool,
    tap: Callable[[int, torch.Tensor], torch.Tensor],
) -> Tuple[torch.Tensor, List[torch.Tensor], bool]:
    """timm's ``forward_intermediates`` walk: ``stem``, then the trunk's modules, keeping
    ``tap(i, x)`` after each module ``i`` that ``indices`` selects (timm's ``feature_take_indices``).

    Returns the last output, the kept maps, and whether the walk reached the trunk's end.
    """
    take_indices, max_index = feature_take_indices(len(trunk), indices)
    kept = []
    x = stem(x)
    for i, module in enumerate(trunk[: max_index + 1] if stop_early else trunk):
        x = module(x)
        if i in take_indices:
            kept.append(tap(i, x))
    return x, kept, max_index == len(trunk) - 1 or not stop_early


def init_transformer_weights(module: nn.Module) -> None:
    """The official NAT / BiFormer / HAT init (``model.apply``): trunc_normal(0.02) Linear weights,
    zero biases, unit LayerNorm; convs keep torch's default."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
