"""Layers shared by visattn model families."""
from .blocks import NHWCTransformerBlock
from .global_attention import GlobalAttentionRPB, relative_position_index
from .neighborhood_attention import NeighborhoodAttention2d
from .norm import LayerNorm
from .pixel_attention import PixelAttention, PixelAttentionConv, PixelAttentionUpsampler
from .routed_attention import AttentionLePE, BiLevelRoutingAttention
from .spatial_shift import ShiftMlp, spatial_shift
from .sr import RCAB, ChannelAttention, ChannelAttentionConvBlock, MeanShift, PixelShuffleUpsampler, ResidualGroup
from .window_attention import OverlappingWindowAttention, WindowAttention

__all__ = ["AttentionLePE", "BiLevelRoutingAttention", "ChannelAttention", "ChannelAttentionConvBlock",
           "GlobalAttentionRPB", "LayerNorm", "MeanShift", "NHWCTransformerBlock", "NeighborhoodAttention2d",
           "OverlappingWindowAttention", "PixelAttention", "PixelAttentionConv", "PixelAttentionUpsampler",
           "PixelShuffleUpsampler", "RCAB", "ResidualGroup", "ShiftMlp", "WindowAttention", "relative_position_index",
           "spatial_shift"]
