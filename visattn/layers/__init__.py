"""Layers shared by visattn model families."""
from .blocks import NHWCTransformerBlock
from .global_attention import GlobalAttentionRPB, relative_position_index
from .neighborhood_attention import NeighborhoodAttention2d
from .routed_attention import AttentionLePE, BiLevelRoutingAttention

__all__ = ["AttentionLePE", "BiLevelRoutingAttention", "GlobalAttentionRPB", "NHWCTransformerBlock",
           "NeighborhoodAttention2d", "relative_position_index"]
