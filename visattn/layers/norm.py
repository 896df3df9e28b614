"""Normalisation layers that run on visattn's op layer."""
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import register_notrace_module

from visattn.kernels.layer_norm import layer_norm

__all__ = ["LayerNorm"]


@register_notrace_module  # the op picks a backend from tensor properties: a leaf for torch.fx
class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` over the last axis (same parameters and state-dict keys) whose forward is
    :func:`visattn.kernels.layer_norm`: the Triton kernels (forward and backward) on CUDA,
    ``F.layer_norm`` on CPU, under ``torch.compile`` and in TorchScript.

    ``autocast_output`` (an attribute, default False; see :func:`~visattn.kernels.layer_norm`): under
    autocast, return the autocast dtype instead of fp32, for norms whose output feeds only ops that
    autocast casts to it anyway (:class:`~visattn.layers.NHWCTransformerBlock` sets it on its norms
    when built with ``autocast_norm_output=True``)."""

    autocast_output: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return self._normalize(x)

    @torch.jit.ignore
    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.normalized_shape) != 1:
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return layer_norm(x, self.weight, self.bias, self.eps, autocast_output=self.autocast_output)
