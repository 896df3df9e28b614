"""CUDA graphs of the fused blocks' forward and backward, replayed in eager training.

Why: a fused block (:mod:`visattn.layers.fused_block`) still issues ~35 launches (forward and
backward) from Python, and on the H200 machine's host that takes 450 µs forward and 610 µs
backward (torch.profiler, DiNAT-T, 2026-12-03): for DiNAT-T's 30 blocks the host issued a step in
64 ms against 40 ms of GPU time. A graph replay issues a block's kernels in one launch.

How it stays the block's function:

- Per block and per call signature (shapes, strides, dtypes, autocast dtype, training mode, the
  layer-scale / drop-path settings) one :class:`BlockGraphs` entry. Its first call runs the
  fused block as it is (the kernels compile and tune); the second captures the forward in a graph
  (``static_x`` in, the output and the tensors the backward needs in the graph's memory); the
  backward of that call runs the fused backward on those tensors (compiling what differs), and the
  next backward captures it into the same memory pool.
- Each call copies its input into ``static_x`` and returns copies of the graph's outputs, so no
  caller holds graph memory that a replay overwrites; the parameter gradients come as fresh
  tensors, which autograd's accumulation takes over as they are.
- A forward replay overwrites the activations of the previous one: it only replays when the
  previous replay's backward has run or its autograd graph is gone; otherwise (two forwards before
  one backward) the call runs the fused block without graphs. A backward whose activations were
  overwritten anyway (a second backward through a retained graph after another forward) raises.
- Drop-path draws come from the graph-safe CUDA generator (new numbers every replay, torch's
  philox offsets), so graphed steps draw other samples than eager ones under the same seed.
- Graphs are used for attention modules whose fused ops are known to run under capture
  (``fused_graphs = True``: neighborhood attention; not yet BiFormer's routed attention).
- Graphs are not used while saved-tensor hooks are active (activation checkpointing, offloading:
  they must see the saved tensors), while a stream is being captured (a whole-step graph), without
  grad mode, or when the parameters were moved or replaced (the entry is then rebuilt).

``NHWCTransformerBlock.cuda_graphs = False`` (class or instance) or ``VISATTN_BLOCK_GRAPHS=0``
turns them off.
"""
from __future__ import annotations

import os
import warnings
import weakref
from typing import Dict, Hashable, List, Optional, Sequence, Tuple

import torch

from visattn.kernels._checks import autocast_dtype
from visattn.layers.fused_block import Tape, fused_block_apply

__all__ = ["BlockGraphs", "graphs_usable", "graphed_block_apply"]

# Signatures per block whose graphs are kept (each holds a copy of the block's activations); a
# new one past this evicts the oldest.
MAX_SIGNATURES = 2
_GRAPHS: "weakref.WeakKeyDictionary[torch.nn.Module, Dict[Hashable, BlockGraphs]]" = weakref.WeakKeyDictionary()


class _Replay:
    """Stands for one forward replay on its autograd node: alive while the node is, ``done`` once
    its backward ran."""
    __slots__ = ("done", "__weakref__")

    def __init__(self) -> None:
        self.done = False


def _copies(tensors: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    # Fresh copies in one multi-tensor launch: ``x * 1`` keeps every value bit for bit (-0.0, inf
    # and subnormals included; the product is exact in the op's fp32 math), and torch 2.11 has
    # no _foreach_clone.
    return list(torch._foreach_mul(tensors, 1.0))


class BlockGraphs:
    """The forward and backward graphs of one block at one call signature (see the module doc)."""

    def __init__(self, params: Sequence[Optional[torch.Tensor]]):
        self.param_ptrs = _data_ptrs(params)
        self.calls = 0
        self.failed = False
        self.forward_graph: Optional[torch.cuda.CUDAGraph] = None
        self.backward_graph: Optional[torch.cuda.CUDAGraph] = None
        self.static_x: Optional[torch.Tensor] = None
        self.static_out: Optional[torch.Tensor] = None
        self.saved: List[Optional[torch.Tensor]] = []
        self.constants: List[object] = []
        self.static_grad: Optional[torch.Tensor] = None
        self.static_grads: List[torch.Tensor] = []  # grad_x, then the present parameter gradients
        self.grad_present: Tuple[bool, ...] = ()  # which of the parameter gradients are not None
        self.backwards = 0  # backwards run on this entry's activations without a graph
        self.generation = 0  # forward replays so far
        self.last_replay: Optional[weakref.ref] = None

    def replay_pending(self) -> bool:
        """Whether the last forward replay's activations are still needed by a backward."""
        replay = None if self.last_replay is None else self.last_replay()
        return replay is not None and not replay.done

    def try_capture(self, direction: str, capture, *args) -> None:
        """``capture(*args)``; when it fails, this entry captures nothing more and the block runs
        that direction (the forward: both) without graphs, with a warning."""
        try:
            capture(*args)
        except RuntimeError as error:
            self.failed = True
            warnings.warn(f"visattn: capturing a fused block's {direction} in a CUDA graph failed ({error}); "
                          f"this block's {direction} runs without one", stacklevel=4)

    def capture_forward(self, block: torch.nn.Module, x: torch.Tensor, compute_dtype: Optional[torch.dtype]) -> None:
        self.static_x = torch.empty_like(x)
        self.static_x.copy_(x)
        graph, tape = torch.cuda.CUDAGraph(), Tape(compute_dtype)
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self.static_out = block.fused_forward(tape, self.static_x)
        self.forward_graph, self.saved, self.constants = graph, tape.tensors, tape.constants

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.static_x.copy_(x)
        self.forward_graph.replay()
        self.generation += 1
        return self.static_out.clone()

    def _tape(self, compute_dtype: Optional[torch.dtype]) -> Tape:
        return Tape(compute_dtype, self.saved, self.constants)

    def _capture_backward(self, block: torch.nn.Module, grad: torch.Tensor, compute_dtype: Optional[torch.dtype]
                          ) -> None:
        self.static_grad = torch.empty_like(grad, memory_format=torch.contiguous_format)
        self.static_grad.copy_(grad)
        graph = torch.cuda.CUDAGraph()
        with torch.autocast(grad.device.type, enabled=False):
            with torch.cuda.graph(graph, pool=self.forward_graph.pool(), capture_error_mode="thread_local"):
                grad_x, param_grads = block.fused_backward(self._tape(compute_dtype), self.static_grad)
        self.grad_present = tuple(g is not None for g in param_grads)
        self.static_grads = [grad_x] + [g for g in param_grads if g is not None]
        self.backward_graph = graph

    def backward(self, block: torch.nn.Module, grad: torch.Tensor, compute_dtype: Optional[torch.dtype]
                 ) -> Tuple[torch.Tensor, tuple]:
        if self.backward_graph is None and self.backwards > 0 and not self.failed:
            self.try_capture("backward", self._capture_backward, block, grad, compute_dtype)
        if self.backward_graph is None:
            self.backwards += 1
            with torch.autocast(grad.device.type, enabled=False):
                return block.fused_backward(self._tape(compute_dtype), grad)
        self.static_grad.copy_(grad)
        self.backward_graph.replay()
        grad_x, *present = _copies(self.static_grads)
        param_grads = [present.pop(0) if has else None for has in self.grad_present]
        return grad_x, tuple(param_grads)


def _data_ptrs(params: Sequence[Optional[torch.Tensor]]) -> tuple:
    return tuple(0 if p is None else p.data_ptr() for p in params)


class _GraphedBlock(torch.autograd.Function):
    @staticmethod
    def forward(ctx, graphs: BlockGraphs, block, compute_dtype, x, *params):
        out = graphs.forward(x)
        ctx.replay, ctx.generation = _Replay(), graphs.generation
        ctx.graphs, ctx.block, ctx.compute_dtype = graphs, block, compute_dtype
        graphs.last_replay = weakref.ref(ctx.replay)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        graphs = ctx.graphs
        if graphs.generation != ctx.generation:
            raise RuntimeError(
                "visattn: this backward needs activations of a fused block's CUDA graph that a later forward "
                "overwrote (a second backward through a retained graph after another forward); run such "
                "code with NHWCTransformerBlock.cuda_graphs = False or VISATTN_BLOCK_GRAPHS=0")
        ctx.replay.done = True
        grad_x, param_grads = graphs.backward(ctx.block, grad, ctx.compute_dtype)
        return (None, None, None, grad_x, *param_grads)


def _signature(block: torch.nn.Module, x: torch.Tensor, compute_dtype: Optional[torch.dtype]) -> Hashable:
    residual = tuple(block._residual_args(ls, dp)[1:] + (ls.__class__,)
                     for ls, dp in ((block.ls1, block.drop_path1), (block.ls2, block.drop_path2)))
    return (tuple(x.shape), x.stride(), x.dtype, x.device, compute_dtype, block.training, residual)


def graphs_usable(block: torch.nn.Module, x: torch.Tensor) -> bool:
    """Whether a fused call of ``block`` on ``x`` may run from CUDA graphs (see the module doc)."""
    return (getattr(block, "cuda_graphs", False) and getattr(block.attn, "fused_graphs", False)
            and x.is_cuda and torch.is_grad_enabled() and os.environ.get("VISATTN_BLOCK_GRAPHS", "1") != "0"
            and not torch.cuda.is_current_stream_capturing()
            and torch._C._autograd._top_saved_tensors_default_hooks(False) is None)


def graphed_block_apply(block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``block(x)`` (a block whose fused path is taken, see :func:`graphs_usable`) from its
    graphs where they can run, else as :func:`~visattn.layers.fused_block.fused_block_apply`."""
    compute_dtype, params = autocast_dtype(x.device.type), block.fused_parameters()
    by_signature = _GRAPHS.setdefault(block, {})
    key = _signature(block, x, compute_dtype)
    graphs = by_signature.get(key)
    if graphs is not None and graphs.param_ptrs != _data_ptrs(params):
        graphs = None  # parameters moved or replaced: the graphs read the old memory
    if graphs is None:
        if len(by_signature) >= MAX_SIGNATURES and key not in by_signature:
            by_signature.pop(next(iter(by_signature)))
        graphs = by_signature[key] = BlockGraphs(params)
    graphs.calls += 1
    if graphs.failed or graphs.calls == 1 or graphs.replay_pending():
        return fused_block_apply(block, x)
    if graphs.forward_graph is None:
        graphs.try_capture("forward", graphs.capture_forward, block, x, compute_dtype)
        if graphs.forward_graph is None:
            return fused_block_apply(block, x)
    return _GraphedBlock.apply(graphs, block, compute_dtype, x, *params)
