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

The second half reads a real ``torch.profiler`` run instead: ``profiled_kernels`` takes the timed
kernels out of it and ``kernel_breakdown`` says where a step's kernel time goes, by kind of kernel
(``KERNEL_CATEGORIES``); ``tools/bench_train.py --profile-steps`` reports it.
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
import weakref
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from unittest import mock

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
    if name == "copy_":  # copy_(self=dst, src)
        src, dst = args[1], args[0]
    elif name == "_to_copy":  # _to_copy(self) -> dst
        src, dst = args[0], out
    else:  # _copy_from(self, dst), _copy_from_and_resize(self, dst)
        src, dst = args[0], args[1]
    if not (isinstance(src, torch.Tensor) and isinstance(dst, torch.Tensor)):
        return None
    kinds = (src.device.type, dst.device.type)
    if "cpu" in kinds and "meta" not in kinds and kinds[0] != kinds[1]:
        return f"{kinds[0]}->{kinds[1]}"
    return None


def _has_mask_index(args: tuple) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())


@contextlib.contextmanager
def _counting_device_waits(syncs: Counter[str]) -> Iterator[None]:
    """Count whole-device waits (``torch.cuda.synchronize``, DeepSpeed's accelerator's), which no
    dispatched operation shows, into ``syncs`` while the block runs.

    DeepSpeed's throughput timer waits this way on the CPU too (a no-op there), so a CPU run sees it.
    """
    owners: list[Any] = [torch.cuda]
    if "deepspeed.accelerator" in sys.modules:
        from deepspeed.accelerator import get_accelerator

        owners.append(get_accelerator())
    inside = False  # DeepSpeed's CUDA accelerator calls torch.cuda's: count the outer call only

    def counting(original: Callable) -> Callable:
        def synchronize(*args: Any, **kwargs: Any) -> Any:
            nonlocal inside
            if inside:
                return original(*args, **kwargs)
            syncs[f"device synchronize @ {_call_site(skip_torch=False)}"] += 1
            inside = True
            try:
                return original(*args, **kwargs)
            finally:
                inside = False

        return synchronize

    with contextlib.ExitStack() as patches:
        for owner in owners:
            patches.enter_context(mock.patch.object(owner, "synchronize", counting(owner.synchronize)))
        yield


class StepProbe(TorchDispatchMode):
    """Counts kernels, host syncs and live tensor bytes of the operations run inside it.

    ``probe.track(*tensors_or_modules_or_optimizers)`` registers what already exists (weights,
    optimiser state, the input batch), so the peak includes it; ``with probe.phase("backward"):``
    attributes kernels to a named phase. Results: ``kernels`` (per phase), ``syncs`` (``op @ site``
    -> count; whole-device waits as ``device synchronize @ site``), ``peak_bytes``, ``peak_phase``,
    ``live_bytes`` (now).
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

    def __enter__(self) -> StepProbe:
        self._waits = _counting_device_waits(self.syncs)
        self._waits.__enter__()
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        try:
            super().__exit__(*exc)
        finally:
            self._waits.__exit__(None, None, None)

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


# ------------------------------------------------------------------------------- kernel time
# Where a profiled step spends its device time, by kind of kernel. The first pattern found in the
# lower-cased name decides, so the order matters: attention before GEMM (some attention kernels
# carry "cutlass"), GEMM before inductor (inductor's matmul templates are ``triton_tem_*``),
# inductor before the eager kinds (its fused kernels name every op they fuse), copy before
# elementwise (``direct_copy_kernel`` runs inside an elementwise kernel). On the CPU the "kernels"
# are the ATen operations' own time.
KERNEL_CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("attention", ("flash", "fmha", "sdpa", "attention")),
    ("gemm", ("triton_tem", "gemm", "gemv", "nvjet", "xmma", "cutlass", "splitk", "cublas", "aten::mm",
              "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_addmm_activation", "convolution")),
    ("communication", ("nccl", "gloo", "all_reduce", "allreduce", "all_gather", "reduce_scatter", "c10d")),
    ("inductor_fused", ("triton_",)),  # other Triton kernels; INDUCTOR_FUSED_PREFIXES come first
    ("optimizer_ema", ("adam", "foreach", "multi_tensor_apply", "lerp")),
    ("copy", ("memcpy", "memset", "copy", "catarray", "aten::cat", "aten::clone", "aten::fill_", "aten::zero_")),
    ("index_sort", ("index", "gather", "scatter", "sort", "topk")),
    ("norm", ("layer_norm", "layernorm")),
    ("elementwise_reduce", ("elementwise", "reduce", "softmax", "gelu", "aten::add", "aten::mul", "aten::sub",
                            "aten::div", "aten::sum", "aten::mean", "aten::pow", "aten::sqrt", "aten::rsqrt",
                            "aten::exp", "aten::var", "aten::std", "aten::where", "aten::neg", "aten::abs")),
)  # fmt: skip
# Inductor's pointwise, reduction, persistent-reduction and foreach kernels: a copy feeding the
# attention is ``triton_poi_fused__scaled_dot_product_flash_attention_...``, not attention.
INDUCTOR_FUSED_PREFIXES = ("triton_poi_", "triton_red_", "triton_per_", "triton_for_", "cpp_fused_")
OTHER_KERNELS = "other"
# Every category a breakdown can report, in the order tables show them.
KERNEL_CATEGORY_ORDER: tuple[str, ...] = (*(name for name, _ in KERNEL_CATEGORIES), OTHER_KERNELS)
# Which of SDPA's backends an attention kernel belongs to; cuDNN first, as its kernels' names carry
# "flash" too (``cudnn_generated_fort_native_sdpa_sm90_flash_fprop_*``). The dispatching
# ``aten::scaled_dot_product_attention`` matches none: it is not a backend.
ATTENTION_BACKENDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("cudnn", ("cudnn",)),
    ("efficient", ("fmha", "memeff", "efficient_attention")),
    ("flash", ("flash",)),
    ("math", ("attention_math",)),
)


def _first_match(lowered: str, table: tuple[tuple[str, tuple[str, ...]], ...]) -> str | None:
    """The name of the first ``(name, patterns)`` entry with a pattern in ``lowered``, else None."""
    return next((name for name, patterns in table if any(pattern in lowered for pattern in patterns)), None)


def kernel_category(name: str) -> str:
    """The ``KERNEL_CATEGORIES`` name of a kernel (CUDA kernel name or ATen op), else ``"other"``."""
    lowered = name.lower()
    if lowered.startswith(INDUCTOR_FUSED_PREFIXES):  # before all patterns: named after what they fuse
        return "inductor_fused"
    return _first_match(lowered, KERNEL_CATEGORIES) or OTHER_KERNELS


def attention_backend(name: str) -> str | None:
    """The SDPA backend (``cudnn``, ``efficient``, ``flash``, ``math``) an attention kernel belongs to."""
    if kernel_category(name) != "attention":
        return None
    return _first_match(name.lower(), ATTENTION_BACKENDS)


def attention_backends(names: Iterable[str]) -> list[str]:
    """The SDPA backends whose kernels appear in ``names``: which one torch picked shows only in the
    kernels it ran."""
    seen = {attention_backend(name) for name in names}
    return [backend for backend, _ in ATTENTION_BACKENDS if backend in seen]


def profiled_kernels(prof: torch.profiler.profile, device_type: str) -> list[tuple[str, float]]:
    """(name, microseconds) of every kernel in a finished ``torch.profiler`` run.

    On a GPU: the device's own events (kernels, memcpy, memset), as timed by CUPTI. On the CPU:
    the self time of every ATen operation (the wrappers around them, autograd nodes and Python,
    are left out; their time is host overhead, not work).
    """
    from torch.autograd import DeviceType

    events = prof.events()
    if device_type == "cpu":
        return [(e.name, e.self_cpu_time_total) for e in events
                if e.device_type == DeviceType.CPU and e.name.startswith("aten::")]  # fmt: skip
    # GPU-side spans of ``record_function`` regions (torch.compile's among them) are device events
    # too, each covering kernels counted on their own.
    return [(e.name, e.time_range.elapsed_us()) for e in events
            if e.device_type != DeviceType.CPU and not getattr(e, "is_user_annotation", False)]  # fmt: skip


def kernel_breakdown(kernels: list[tuple[str, float]], steps: int, top: int = 12) -> dict[str, Any]:
    """Per-step kernel time and launches, the share of each category, and the longest kernels.

    ``kernels``: (name, microseconds) pairs of ``steps`` profiled steps (``profiled_kernels``).
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    time_by_name: Counter[str] = Counter()
    calls: Counter[str] = Counter()
    for name, us in kernels:
        time_by_name[name] += us
        calls[name] += 1
    total_us = sum(time_by_name.values())
    by_category: Counter[str] = Counter()
    for name, us in time_by_name.items():
        by_category[kernel_category(name)] += us
    present = [c for c in KERNEL_CATEGORY_ORDER if by_category[c]]  # time spent: total_us > 0
    return {
        "kernel_ms_per_step": round(total_us / steps / 1e3, 3),
        "kernels_per_step": round(len(kernels) / steps, 1),
        "share": {c: round(by_category[c] / total_us, 4) for c in present},
        "ms_per_step": {c: round(by_category[c] / steps / 1e3, 3) for c in present},
        "attention_backends": attention_backends(time_by_name),
        "top": [
            {"name": name[:160], "category": kernel_category(name), "ms_per_step": round(us / steps / 1e3, 3),
             "calls_per_step": round(calls[name] / steps, 1)}
            for name, us in time_by_name.most_common(top)
        ],
    }  # fmt: skip
