"""Selective recomputation: keep the inputs of cheap element-wise modules, recompute their outputs in backward.

In a Whisper layer, the output of a LayerNorm or of the GELU is saved by the matrix product that reads
it (q/k/v projections, fc1, fc2), although the LayerNorm or GELU itself already keeps its input for its
own backward. Under :func:`selective_recompute`, such saved outputs are replaced by a reference to the
input and recomputed in backward. No matrix product is recomputed, and the result is bit-identical
(the recomputation runs the same deterministic kernel on the same input).

:func:`observe_saved_tensors` reports every tensor that autograd actually keeps for backward, with or
without selective recomputation; the benchmark and the tests measure activation memory with it.

Both pack hooks hand autograd a detached alias (same storage, no ``grad_fn``), never the saved tensor itself:
a node's own output saved as itself would make the node and the tensor hold each other, a cycle in C++ that
no garbage collector breaks, so a graph dropped without a backward pass (a measurement, an aborted step)
would stay in memory for good.
"""

from __future__ import annotations

import contextlib
import weakref
from contextvars import ContextVar
from typing import Callable, Iterator

import torch
from torch import nn

_observer: ContextVar[Callable[[torch.Tensor], None] | None] = ContextVar("saved_tensor_observer", default=None)


def report_kept(tensor: torch.Tensor) -> None:
    """Tell an active :func:`observe_saved_tensors` about a tensor kept for backward by other means
    (for example the input of a checkpointed function, which its recompute closure holds)."""
    observer = _observer.get()
    if observer is not None:
        observer(tensor)


class _Recompute:
    """A saved tensor stood in for by ``module(input)``, rebuilt with the saved view's geometry."""

    __slots__ = ("module", "input", "size", "stride", "offset")

    def __init__(self, module: nn.Module, inp: torch.Tensor, saved: torch.Tensor, output: torch.Tensor):
        self.module, self.input = module, inp
        self.size, self.stride = saved.size(), saved.stride()
        self.offset = saved.storage_offset() - output.storage_offset()

    def rebuild(self) -> torch.Tensor:
        with torch.no_grad():
            output = self.module(self.input)
        return output.as_strided(self.size, self.stride, output.storage_offset() + self.offset)


def elementwise_modules(model: nn.Module) -> list[nn.Module]:
    """LayerNorms and activation modules inside Whisper encoder and decoder layers."""
    picked = []
    for module in model.modules():
        if type(module).__name__ in ("WhisperEncoderLayer", "WhisperDecoderLayer"):
            picked += [m for m in module.modules() if isinstance(m, nn.LayerNorm)]
            if isinstance(module.activation_fn, nn.Module):
                picked.append(module.activation_fn)
    return picked


@contextlib.contextmanager
def selective_recompute(modules: list[nn.Module]) -> Iterator[None]:
    """Within the block, outputs of ``modules`` saved for backward are recomputed from their inputs."""
    produced: dict[int, tuple[weakref.ref, nn.Module, torch.Tensor]] = {}

    def remember(module, args, output):
        if torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.requires_grad:
            produced[id(output)] = (weakref.ref(output), module, args[0])

    def pack(saved: torch.Tensor):
        base = saved._base if saved._base is not None else saved
        entry = produced.get(id(base))
        if entry is not None and entry[0]() is base:
            return _Recompute(entry[1], entry[2], saved, base)
        report_kept(saved)
        return saved.detach()

    def unpack(packed):
        return packed.rebuild() if isinstance(packed, _Recompute) else packed

    handles = [m.register_forward_hook(remember) for m in modules]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield
    finally:
        for handle in handles:
            handle.remove()
        produced.clear()


@contextlib.contextmanager
def observe_saved_tensors(observer: Callable[[torch.Tensor], None]) -> Iterator[None]:
    """Call ``observer`` on every tensor autograd keeps for backward inside the block.

    Works alone and together with :func:`selective_recompute` (which reports the tensors it keeps).
    """
    token = _observer.set(observer)

    def pack(saved: torch.Tensor):
        report_kept(saved)
        return saved.detach()

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield
    finally:
        _observer.reset(token)


class SavedBytes:
    """Bytes autograd keeps for backward, each storage counted once, except the storages of ``exclude``
    (the parameters and the batch: they exist whether or not anything is saved)."""

    def __init__(self, exclude):
        self.exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self.storages: dict[int, int] = {}

    def __call__(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key not in self.exclude and key != 0:
            self.storages[key] = storage.nbytes()

    @property
    def total(self) -> int:
        return sum(self.storages.values())
