"""How a model actor's process runs: the one thread its model runs on, its threads' priority, its allocator,
and the model's precision. Each measured where it matters (see the docstrings); nothing here touches the model
itself.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import torch
from torch import nn

from ..config import int8_on_gpu
from ..errors import ModelError

log = logging.getLogger(__name__)

T = TypeVar("T")


class ModelThread:
    """One thread for all of a model's torch work: its loading and every call. Each thread that runs a
    parallel torch op gets its own team of OpenMP workers, and Ray Data builds a map_batches class on the
    actor's main thread but calls it from a pool thread (Serve's replica, from any thread of asyncio's
    executor). With two teams there are more OpenMP threads than cores, and libgomp then lets its idle
    workers sleep after ~100 spins instead of ~300,000: every one of the decoder's many small parallel
    regions starts by waking them. Measured on 2 cores, tiny.en int8, batches of 16 from a pool thread after
    loading on the main thread: 1.5-1.6 cores busy and 12-25% more wall time (alternated runs) than with
    load and calls on one thread (1.9 cores). Calls from the model thread itself run at once."""

    def __init__(self) -> None:
        self._ident: int | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="ray-whisper-model", initializer=self._started)

    def _started(self) -> None:
        self._ident = threading.get_ident()

    def submit(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> Future[T]:
        """`fn(*args, **kwargs)` on the model thread; the future of its result (asyncio.wrap_future awaits it)."""
        return self._pool.submit(fn, *args, **kwargs)

    def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`fn(*args, **kwargs)` on the model thread, waited for; at once when called from it."""
        if threading.get_ident() == self._ident:
            return fn(*args, **kwargs)
        return self.submit(fn, *args, **kwargs).result()


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse instead of returning it to the OS (no mmap for large blocks,
    no trimming). A CPU forward pass allocates and frees tensors of tens to hundreds of MB; with glibc's
    defaults each is a fresh mmap whose pages fault in zeroed: ~1.2 M page faults and ~3.5 s of system
    time per batch of 16 windows with tiny.en on 2 cores (15% of the batch's wall time). The actor's memory
    then stays at its peak, as a GPU's caching allocator does. Returns False where there is no glibc."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))  # int's largest


def run_at_normal_priority() -> bool:
    """Undo the niceness Ray gives its worker processes (15) for every thread of this one. A model actor
    whose threads run at 15 loses its CPU to any nice-0 process that wakes up (raylet, the driver's
    executor loop, Ray's own actors), and one preempted thread stalls the others at their next barrier.
    Lowering niceness needs CAP_SYS_NICE (root in most Ray containers); returns False where it is refused."""
    try:
        threads = [int(t) for t in os.listdir("/proc/self/task")]  # Linux: niceness is per thread
    except OSError:
        threads = [0]
    done = True
    for tid in threads:
        try:
            if os.getpriority(os.PRIO_PROCESS, tid) > 0:
                os.setpriority(os.PRIO_PROCESS, tid, 0)
        except OSError:
            done = False
    return done


NATIVE_BFLOAT16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})  # /proc/cpuinfo flags of native bfloat16 math


def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags as Linux lists them (empty elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            return frozenset(next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []))
    except OSError:
        return frozenset()


def auto_cpu_dtype(flags: frozenset[str]) -> torch.dtype:
    """--dtype auto on a CPU with these flags: bfloat16 where the CPU computes it natively (AMX or
    AVX512-BF16), float32 elsewhere. Measured on tiny.en, the decoder from memory at the same WER
    (benchmarks/dtypes.py): 1.3-2.2x float32 on an AMD EPYC with AVX512-BF16, 1.5x on an Intel Xeon with AMX.
    Without native bfloat16 the products are converted in software: not measured, so float32 stays."""
    return torch.bfloat16 if flags & NATIVE_BFLOAT16_FLAGS else torch.float32


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """The torch dtype for --dtype on this device: auto is float16 on GPU and auto_cpu_dtype on CPU; int8
    loads in float32 and is quantised after (int8.quantize_linear)."""
    if name == "int8":
        refused = int8_on_gpu(name, 0 if device == "cpu" else 1, "--gpus-per-actor (or --gpus-per-replica)")
        if refused:
            raise ModelError(refused)
        return torch.float32
    if name == "auto":
        return torch.float16 if device == "cuda" else auto_cpu_dtype(cpu_flags())
    if device == "cpu" and name == "float16":
        log.warning("float16 is slow or unsupported on CPU; using float32")
        return torch.float32
    return getattr(torch, name)


class PackedLinear(nn.Module):
    """An nn.Linear through oneDNN's product over a weight laid out for it once (the vocabulary projection's
    path, network.vocabulary_logits): for a float32 decoder step MKL's product of a few rows re-reads the
    weight in its plain layout at a fraction of the memory's speed."""

    def __init__(self, linear: nn.Linear, packed: Any):
        super().__init__()
        self.linear = linear  # the weights stay where the state dict has them
        self.packed = packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.linear.weight.dtype or x.device.type != "cpu":
            return self.linear(x)
        flat = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), self.packed, self.linear.bias,
                                                  "none", [], "")
        return flat.view(*x.shape[:-1], flat.shape[-1])


def pack_linears(net: nn.Module, under: str, pack: Callable[[torch.Tensor], Any]) -> int:
    """Every nn.Linear of `net` under `under` (a module path) replaced, in place, by a PackedLinear over
    `pack(weight)` (network.pack_for_onednn: None where this torch lacks the op or a probe disagrees with
    F.linear, and the layer is left as it is). Returns the number of layers packed."""
    def packed(linear: nn.Module, owner: nn.Module, name: str) -> nn.Module | None:
        weight = pack(linear.weight.detach())
        return None if weight is None else PackedLinear(linear, weight)

    return replace_modules(net.get_submodule(under), nn.Linear, packed)


def replace_modules(net: nn.Module, kind: type[nn.Module], make: Callable[[Any, nn.Module, str], nn.Module | None],
                    keep: tuple[str, ...] = ()) -> int:
    """Every module of `net` of type `kind` whose own name is not in `keep` replaced, in place, by
    `make(module, its owner, its name)`; a None from `make` leaves it as it is. Returns how many were replaced."""
    count = 0
    for path, module in list(net.named_modules()):
        owner_path, _, name = path.rpartition(".")
        if isinstance(module, kind) and name not in keep:
            owner = net.get_submodule(owner_path)
            replacement = make(module, owner, name)
            if replacement is not None:
                setattr(owner, name, replacement)
                count += 1
    return count
