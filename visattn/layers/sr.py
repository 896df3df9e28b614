"""Layers shared by the super-resolution families (RCAN, HAN, HAT, PAN, A2N, TCSR)."""
from typing import Sequence

import torch
import torch.nn as nn
from timm.layers import register_notrace_module


class ChannelAttention(nn.Module):
    """Squeeze-and-excitation channel attention (RCAN's CALayer, HAT's CAB attention).

    ``x * sigmoid(fc2(relu(fc1(avgpool(x)))))`` with 1x1 convs ``channels -> channels // reduction
    -> channels``. Input and output: ``[B, channels, H, W]``.
    """

    def __init__(self, channels: int, reduction: int):
        super().__init__()
        if channels // reduction < 1:
            raise ValueError(f"ChannelAttention: reduction {reduction} leaves no channels of {channels}")
        self.fc1 = nn.Conv2d(channels, channels // reduction, 1)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(channels // reduction, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.fc2(self.act(self.fc1(y))))


@register_notrace_module  # picks the layout from the device: a leaf for torch.fx
class ChannelAttentionConvBlock(nn.Sequential):
    """HAT's CAB: conv3x3 ``C -> hidden``, GELU, conv3x3 ``hidden -> C``, :class:`ChannelAttention`.

    Children ``0, 1, 2, 3`` as in the official ``nn.Sequential`` (so keys map by index). On CUDA
    the input is made NCHW-contiguous first: HAT hands it a permuted channels-last view, on which
    cuDNN's kernels for these narrow convs (HAT-S: 144 -> 6 -> 144) are 2.5x slower and the
    channel-attention mean over (H, W) is a strided reduction (H200, bf16, a 256x256 HAT-S block:
    0.38 -> 0.15 ms for the convs). Input and output ``[B, C, H, W]``.
    """

    def __init__(self, channels: int, hidden: int, reduction: int):
        super().__init__(nn.Conv2d(channels, hidden, 3, padding=1), nn.GELU(), nn.Conv2d(hidden, channels, 3, padding=1),
                         ChannelAttention(channels, reduction))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            x = x.contiguous()
        return self[3](self[2](self[1](self[0](x))))


class MeanShift(nn.Conv2d):
    """EDSR-style mean shift: a 1x1 conv initialised to ``x + sign * rgb_range * mean``.

    Its weight and bias are ordinary parameters: the official RCAN / HAN / A2N training code left
    them trainable, so released checkpoints may hold drifted values, which load as they are.
    """

    def __init__(self, rgb_range: float, mean: Sequence[float], sign: int = -1):
        super().__init__(3, 3, 1)
        with torch.no_grad():
            self.weight.copy_(torch.eye(3).view(3, 3, 1, 1))
            self.bias.copy_(sign * rgb_range * torch.tensor(mean, dtype=torch.float32))


class PixelShuffleUpsampler(nn.Sequential):
    """Conv + PixelShuffle stages: ``log2(scale)`` x2 stages for powers of two, one x3 stage for 3.

    Children are ``[conv, shuffle] * stages`` (the layout of EDSR's ``Upsampler`` and HAT's
    ``Upsample``, so official keys map by index). Input ``[B, C, H, W]``, output ``[B, C, sH, sW]``.
    """

    def __init__(self, scale: int, channels: int):
        if scale not in (2, 3, 4, 8):
            raise ValueError(f"PixelShuffleUpsampler: scale must be 2, 3, 4 or 8, got {scale}")
        factors = [3] if scale == 3 else [2] * (scale.bit_length() - 1)
        layers = []
        for f in factors:
            layers += [nn.Conv2d(channels, f * f * channels, 3, padding=1), nn.PixelShuffle(f)]
        super().__init__(*layers)


class RCAB(nn.Module):
    """Residual channel-attention block of RCAN / HAN: ``x + CA(conv(relu(conv(x))))``.

    Two 3x3 convs with bias and a :class:`ChannelAttention`. Input and output ``[B, channels, H, W]``.
    The official RCAB takes a ``res_scale`` but never applies it (the scaling line is commented
    out), so there is no residual scale here.
    """

    def __init__(self, channels: int, reduction: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.attn = ChannelAttention(channels, reduction)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.attn(self.conv2(self.act(self.conv1(x))))


class ResidualGroup(nn.Module):
    """RCAN residual group: ``num_blocks`` :class:`RCAB` then a 3x3 conv, with a skip over the whole group.

    Input and output ``[B, channels, H, W]``.
    """

    def __init__(self, channels: int, reduction: int, num_blocks: int):
        super().__init__()
        self.blocks = nn.Sequential(*[RCAB(channels, reduction) for _ in range(num_blocks)])
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(self.blocks(x))
