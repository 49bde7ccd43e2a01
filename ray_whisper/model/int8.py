"""--dtype int8: the network's linear layers with int8 weights, quantised once at load (`quantize_linear`).

PyTorch's dynamically quantised linear (torch.ao, fbgemm on x86) quantises its input with one scale for the
whole call, on 7 bits. An encoder call holds every frame of every window in the batch (8 windows: 12,000
rows), and frames of speech, pause and noise differ in range by orders of magnitude, so one scale leaves the
quiet frames a few levels. The encoder's linears therefore take their input with a scale per row
(`RowScaledLinear`), as CTranslate2's int8 does; a decoder step's few rows keep torch's own. On 31 min of
varied audio (benchmarks/varied.py, the decoder from memory, 2-core AMD EPYC): float32 42.09% WER, int8 with
one scale per call 44.05%, int8 with a scale per encoder row 41.0-42.3% (docs/performance.md).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

TINY = 1e-12  # the smallest row scale: an all-zero row stays zero instead of dividing by zero


def quantize_linear(net: nn.Module, keep: tuple[str, ...] = ("proj_out",)) -> int:
    """Every nn.Linear of `net` but those named in `keep` replaced, in place, by PyTorch's dynamically
    quantised int8 linear (int8 weights with a scale per output channel, activations quantised per call),
    those of the encoder wrapped in a RowScaledLinear. A scale per output channel, not one per matrix: the
    decoder from memory on 32.6 min of speech went from 2.47% WER to 1.98% (float32: 1.68%) at the same speed.
    The vocabulary projection is kept in float32: it runs through the packed oneDNN product
    (network.vocabulary_logits), and quantising it too cost WER (tiny.en, 3 min of speech: 1.63% -> 1.83%)
    for ~9% more speed. Returns the number of layers quantised."""
    from torch.ao.nn.quantized.dynamic import Linear as QuantizedLinear
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    spec = {name: per_channel_dynamic_qconfig for name, m in net.named_modules() if isinstance(m, nn.Linear) and name not in keep}
    with warnings.catch_warnings():  # torch.ao's eager quantisation says it moves to torchao; it still works
        warnings.simplefilter("ignore")
        quantize_dynamic(net, spec, dtype=torch.qint8, inplace=True)
    encoder = net.get_submodule("model.encoder")
    for name, module in list(encoder.named_modules()):
        if isinstance(module, QuantizedLinear):
            owner, _, leaf = name.rpartition(".")
            parent = encoder.get_submodule(owner)
            consumed = leaf in getattr(parent, "TEMPORARY_INPUTS", ())
            setattr(parent, leaf, RowScaledLinear(module, consumed))
    return len(spec)


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
