"""What a training step asks of the device, counted on any machine (no GPU needed).

``StepProbe`` is a ``TorchDispatchMode``: it sees every ATen operation after autograd, so it counts
the kernels an eager step launches (forward, backward, optimiser, EMA), lists the operations that
make a CUDA device wait for the host (``.item()``, ``nonzero``, boolean indexing, ...) with the line
of code that issued them, and follows every tensor storage's lifetime to give the step's peak
tensor memory. Under ``FakeTensorMode`` nothing is computed, so a full-size ViT-L step is counted
in seconds on a laptop CPU; ``tools/bench_step_counts.py`` does that.

A tensor made from host values (``torch.tensor``, ``new_tensor``, ``as_tensor`` of Python numbers,
seen as ``lift_fresh``) is listed too: on a CUDA device it is a blocking host-to-device copy. So is
every copy between the CPU and another device (``.to(device)``, ``.cpu()``, ``copy_``), which a
run on fake CUDA tensors shows (``tools/bench_step_counts.py --fake-device cuda``); a CPU run
never makes one.

What it cannot see: the CUDA caching allocator's rounding and fragmentation (the peak here is the
bytes of live tensors, a lower bound of ``torch.cuda.max_memory_allocated``), and syncs inside
CUDA libraries (a stream synchronisation, a pageable copy inside an extension).
"""

from __future__ import annotations

import contextlib
import os
import traceback
import weakref
from collections import Counter
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

# Operations after which a CUDA device's host must wait for the device: a value or a
# data-dependent shape is read back.
SYNC_OPS = frozenset({
    "_local_scalar_dense",  # .item(), float(t), bool(t), int(t)
    "is_nonzero",
    "equal",
    "nonzero",
    "masked_select",
    "_unique2",
    "unique_dim",
    "unique_consecutive",
    "repeat_interleave",  # without output_size it reads the repeats back
    "_assert_scalar",
})  # fmt: skip

# A tensor made from host values (torch.tensor, new_tensor, as_tensor): on CUDA a blocking copy.
HOST_DATA_OPS = frozenset({"lift_fresh", "lift_fresh_copy"})

# Copies that can cross devices: a CPU <-> device copy makes the host wait (pageable memory).
COPY_OPS = frozenset({"_to_copy", "copy_", "_copy_from", "_copy_from_and_resize"})

# Indexing with a boolean mask needs the mask's nonzero count on the host (on CUDA).
MASK_INDEX_OPS = frozenset({"index", "index_put", "index_put_", "_index_put_impl_"})

# Dispatched operations that do not launch a kernel: views (``OpOverload.is_view``) and these.
NO_KERNEL_OPS = frozenset({
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "lift_fresh",
    "_unsafe_view", "_reshape_alias", "set_", "resize_", "sym_size", "sym_stride", "sym_numel",
    "sym_storage_offset", "is_same_size", "_has_compatible_shallow_copy_type",
})  # fmt: skip


def _call_site(skip_torch: bool = True) -> str:
    """``file:line:function`` of the innermost frame outside torch (where a sync was asked for)."""
    frames = traceback.extract_stack()[:-2]
    here = os.path.abspath(__file__)
    for frame in reversed(frames):
        path = os.path.abspath(frame.filename)
        if path == here or (skip_torch and f"{os.sep}torch{os.sep}" in path):
            continue
        return f"{os.path.relpath(path) if path.startswith(os.getcwd()) else path}:{frame.lineno}:{frame.name}"
    return "?"


def _host_device_copy(name: str, args: tuple, out: Any) -> str | None:
    """``"cpu->cuda"`` / ``"cuda->cpu"`` when a copy operation moves data between host and device."""
    src, dst = (args[1], args[0]) if name in ("copy_", "_copy_from_and_resize") else (args[0], out)
    if name == "_copy_from":
        dst = args[1]
    if not (isinstance(src, torch.Tensor) and isinstance(dst, torch.Tensor)):
        return None
    kinds = (src.device.type, dst.device.type)
    if "cpu" in kinds and "meta" not in kinds and kinds[0] != kinds[1]:
        return f"{kinds[0]}->{kinds[1]}"
    return None


def _has_mask_index(args: tuple) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())


class StepProbe(TorchDispatchMode):
    """Counts kernels, host syncs and live tensor bytes of the operations run inside it.

    ``probe.track(*tensors_or_modules_or_optimizers)`` registers what already exists (weights,
    optimiser state, the input batch), so the peak includes it; ``with probe.phase("backward"):``
    attributes kernels to a named phase. Results: ``kernels`` (per phase), ``syncs`` (``op @ site``
    -> count), ``peak_bytes``, ``peak_phase``, ``live_bytes`` (now).
    """

    def __init__(self) -> None:
        super().__init__()
        self.kernels: Counter[str] = Counter()
        self.views: Counter[str] = Counter()
        self.syncs: Counter[str] = Counter()
        self.ops: Counter[str] = Counter()
        self.live_bytes = 0
        self.peak_bytes = 0
        self.peak_phase = ""
        self.current_phase = "other"
        self._seen: weakref.WeakSet = weakref.WeakSet()

    # ------------------------------------------------------------------------------- tracking
    def _add_storage(self, tensor: torch.Tensor) -> None:
        if not isinstance(tensor, torch.Tensor) or tensor.layout != torch.strided:
            return
        try:
            storage = tensor.untyped_storage()
        except (NotImplementedError, RuntimeError):  # tensor subclasses without a storage
            return
        if storage in self._seen:
            return
        self._seen.add(storage)
        size = storage.nbytes()
        self.live_bytes += size
        weakref.finalize(storage, self._free, size)
        if self.live_bytes > self.peak_bytes:
            self.peak_bytes, self.peak_phase = self.live_bytes, self.current_phase

    def _free(self, size: int) -> None:
        self.live_bytes -= size

    def track(self, *things: Any) -> StepProbe:
        """Count tensors that exist already: tensors, modules (parameters, buffers, gradients) and
        optimisers (their state), in any nesting of lists, tuples and dicts."""
        for thing in things:
            if isinstance(thing, torch.nn.Module):
                for tensor in (*thing.parameters(), *thing.buffers()):
                    self._add_storage(tensor)
                    if tensor.grad is not None:
                        self._add_storage(tensor.grad)
            elif isinstance(thing, torch.optim.Optimizer):
                self.track(list(thing.state.values()))
            else:
                for leaf in tree_leaves(thing):
                    self._add_storage(leaf)
        return self

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        previous, self.current_phase = self.current_phase, name
        try:
            yield
        finally:
            self.current_phase = previous

    # ------------------------------------------------------------------------------- dispatch
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "prim":  # metadata queries (``prim.device`` ...) of tensor subclasses
            return func(*args, **(kwargs or {}))
        name = func._overloadpacket.__name__
        self.ops[name] += 1
        if name in SYNC_OPS or name in HOST_DATA_OPS or (name in MASK_INDEX_OPS and _has_mask_index(args)):
            self.syncs[f"{name} @ {_call_site()}"] += 1
        if func.is_view or name in NO_KERNEL_OPS:
            self.views[self.current_phase] += 1
        else:
            self.kernels[self.current_phase] += 1
        out = func(*args, **(kwargs or {}))
        if name in COPY_OPS and (direction := _host_device_copy(name, args, out)):
            self.syncs[f"{name} {direction} @ {_call_site()}"] += 1
        for leaf in tree_leaves(out):
            self._add_storage(leaf)
        return out

    # ------------------------------------------------------------------------------- results
    def summary(self) -> dict[str, Any]:
        return {
            "kernels": dict(self.kernels),
            "kernels_total": sum(self.kernels.values()),
            "host_syncs": dict(self.syncs),
            "host_syncs_total": sum(self.syncs.values()),
            "peak_tensor_gib": round(self.peak_bytes / 2**30, 3),
            "peak_phase": self.peak_phase,
        }

    def top_ops(self, n: int = 10) -> list[tuple[str, int]]:
        return self.ops.most_common(n)

