"""--dtype int8: the network's linear layers with int8 weights, quantised once at load (`quantize_linear`).

Each linear's input is quantised at every call with a scale per row (a frame, or a decoder row), as
CTranslate2's int8 does: an encoder call holds every frame of 8 windows (12,000 rows), and frames of speech,
pause and noise differ in range by orders of magnitude, so one scale per call leaves the quiet frames a few
levels. On 31 min of varied audio (benchmarks/varied.py, the decoder from memory, 2-core AMD EPYC): float32
42.09% WER, int8 with one scale per call 44.05%, with a scale per encoder row 41.0% (docs/performance.md).

Two kernels, chosen at load (`onednn_int8_works`):
- on a CPU with AMX int8, `Int8Linear`: oneDNN's int8 product, the rest of the network (attention, norms,
  GELU) in the CPU's float dtype (bfloat16: AMX has it). On a 2-core Xeon with AMX an encoder pass over 8
  windows takes 0.55 s, against 0.95 s with torch's dynamic int8 linear and float32 around it (bfloat16
  alone: 0.35 s); 92 min of speech end to end 68.8-73.6 s against 91.0 s (docs/performance.md).
- elsewhere, or where this torch lacks the op or the probe fails: PyTorch's dynamically quantised linear
  (torch.ao, fbgemm) in a float32 network, the encoder's wrapped in `RowScaledLinear`.
"""

from __future__ import annotations

import functools
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn

from .runtime import cpu_flags, replace_modules

TINY = 1e-12  # the smallest row scale: an all-zero row stays zero instead of dividing by zero
LEVELS = 127  # int8's largest magnitude, symmetric (no zero point)


def quantize_linear(net: nn.Module, float_dtype: torch.dtype = torch.float32,
                    keep: tuple[str, ...] = ("proj_out",)) -> str:
    """Every nn.Linear of `net` but those named in `keep` replaced, in place, by an int8 linear (int8 weights
    with a scale per output channel, each call's input quantised with a scale per row). Where oneDNN's int8
    product works (`onednn_int8_works`) they are Int8Linear and the rest of `net` moves to `float_dtype` (the
    CPU's: runtime.auto_cpu_dtype); elsewhere torch.ao's in a float32 network. A scale per output channel, not
    one per matrix: the decoder from memory on 32.6 min of speech went from 2.47% WER to 1.98% (float32:
    1.68%) at the same speed. The vocabulary projection is kept in float (network.vocabulary_logits packs it
    for oneDNN); quantising it too cost WER (tiny.en, 3 min of speech: 1.63% -> 1.83%) for ~9% more speed.
    Returns the kernel: "onednn" or "torch.ao"."""
    if onednn_int8_works():
        replace_modules(net, nn.Linear, lambda linear, owner, name: Int8Linear(linear), keep)
        net.to(float_dtype)
        return "onednn"
    _quantize_with_torch_ao(net, keep)
    return "torch.ao"


class Int8Linear(nn.Module):
    """A linear layer through oneDNN's int8 product: int8 weights (a scale per output channel, packed once for
    this CPU), the input quantised at each call with a scale per row (its largest magnitude), the product
    scaled back per row and the bias added in the input's dtype."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight = linear.weight.detach().float()
        self.out_features = weight.shape[0]
        # plain attributes, not buffers: net.to(dtype) moves the bias but leaves the packed weight and its scales
        self.weight_scale = (weight.abs().amax(1) / LEVELS).clamp_min(TINY)
        quantized = torch.round(weight / self.weight_scale[:, None]).clamp_(-LEVELS, LEVELS).to(torch.int8)
        self.packed = torch.ops.onednn.qlinear_prepack(quantized, None)
        self.weight_zero = torch.zeros(self.out_features, dtype=torch.int64)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        scale = row_scale(flat).float()
        # scaled in float32 whatever x's dtype (bfloat16 would round 127 * x / its row's largest to 8 bits),
        # clamped all the same: an int8 that overflows wraps to the other end
        q = torch.mul(flat, LEVELS / scale).round_().clamp_(-LEVELS, LEVELS).to(torch.int8)
        y = torch.ops.onednn.qlinear_pointwise(q, 1.0, 0, self.packed, self.weight_scale, self.weight_zero, None,
                                               1.0, 0, x.dtype, "none", [], "")
        scale = scale.mul_(1 / LEVELS).to(x.dtype)
        y = y.mul_(scale) if self.bias is None else torch.addcmul(self.bias, y, scale)
        return y.view(*x.shape[:-1], self.out_features)


AMX_INT8_FLAG = "amx_int8"  # /proc/cpuinfo's flag of Intel's AMX int8 tiles


@functools.cache
def onednn_int8_works() -> bool:
    """Whether to take oneDNN's int8 product here: the CPU has AMX int8 (runtime.cpu_flags), this torch has the
    op, it agrees with float32 on a probe (rows of very different range, in float32 and bfloat16) within 3%,
    and it is not far slower than a float32 product of the same size. Measured on a 2-core Xeon with AMX; off
    AMX it was not measured, and with oneDNN held below AMX there (ONEDNN_MAX_CPU_ISA) torch's int8 product
    fell back to a kernel 1000x slower: the timing guards against that."""
    if AMX_INT8_FLAG not in cpu_flags():
        return False
    g = torch.Generator().manual_seed(0)
    linear = nn.Linear(384, 384)
    x = torch.randn(2, 192, 384, generator=g) * torch.logspace(-2, 2, 192).unsqueeze(1)
    try:
        with torch.inference_mode():
            layer = Int8Linear(linear)
            want = linear(x)
            errors = [((layer(x.to(dtype)).float() - want).norm(dim=-1) / want.norm(dim=-1)).max().item()
                      for dtype in (torch.float32, torch.bfloat16)]
            slower = _seconds(layer, x) / _seconds(linear, x)
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
    return max(errors) < 0.03 and slower < 4


def _seconds(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> float:
    """The fastest of three timed calls, after one untimed."""
    fn(x)
    times = []
    for _ in range(3):
        started = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - started)
    return min(times)


def _quantize_with_torch_ao(net: nn.Module, keep: tuple[str, ...]) -> None:
    """torch.ao's dynamically quantised int8 linear for every nn.Linear but `keep`, the encoder's wrapped in a
    RowScaledLinear (a decoder step's few rows keep torch's one scale per call: per row did not help there)."""
    from torch.ao.nn.quantized.dynamic import Linear as QuantizedLinear
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    spec = {name: per_channel_dynamic_qconfig for name, m in net.named_modules()
            if isinstance(m, nn.Linear) and name.rpartition(".")[2] not in keep}
    with warnings.catch_warnings():  # torch.ao's eager quantisation says it moves to torchao; it still works
        warnings.simplefilter("ignore")
        quantize_dynamic(net, spec, dtype=torch.qint8, inplace=True)
    replace_modules(net.get_submodule("model.encoder"), QuantizedLinear, lambda quantized, owner, name:
                    RowScaledLinear(quantized, name in getattr(owner, "TEMPORARY_INPUTS", ())))


class RowScaledLinear(nn.Module):
    """A dynamically quantised int8 linear whose input gets a scale per row: each row is divided by its
    largest magnitude before torch's per-call quantisation and the product is multiplied back, the bias added
    after. Costs two passes over the input and one over the output (~7% of an int8 encoder pass on 2 AMD
    EPYC cores), less where the caller hands over an input nothing else reads (`consumes_input`: it is
    divided in place)."""

    def __init__(self, quantized: nn.Module, consumes_input: bool = False):
        super().__init__()
        weight, bias = quantized._packed_params._weight_bias()
        quantized.set_weight_bias(weight, None)  # the bias goes in after the rows are scaled back
        self.quantized = quantized
        self.bias = bias
        self.consumes_input = consumes_input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = row_scale(x)
        y = self.quantized(x.div_(scale) if self.consumes_input else x / scale)
        return y.mul_(scale) if self.bias is None else torch.addcmul(self.bias, y, scale)


def row_scale(x: torch.Tensor) -> torch.Tensor:
    """Each row's largest magnitude (last dimension kept, as 1), at least TINY: two reductions that only read
    `x`, not abs() that writes a copy of it."""
    return torch.maximum(x.amax(-1, keepdim=True), x.amin(-1, keepdim=True).neg_()).clamp_min_(TINY)
