"""--dtype int8's linear layers (model.int8): their input is quantised with a scale per row, so rows of very
different range each keep their precision, where torch's one scale per call loses the quiet ones; through
oneDNN's int8 product where it works (the rest of the network in the CPU's float dtype), else torch.ao's."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from ray_whisper.model import int8, network


def _quantized(linear: nn.Linear) -> nn.Module:
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    holder = nn.Sequential(copy.deepcopy(linear))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_dynamic(holder, {"0": per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True)
    return holder[0]


@pytest.fixture(scope="module")
def linear() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(256, 192)


def _row_errors(out: torch.Tensor, linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """Each row's error against float32, relative to the size of that row's product (bias left out)."""
    with torch.inference_mode():
        product = x @ linear.weight.T
        return (out - product - linear.bias).norm(dim=-1) / product.norm(dim=-1)


def test_rows_of_very_different_range_each_keep_their_precision(linear):
    """Rows 10^-3 to 10^2 in one call (a pause beside loud speech): one scale per call leaves the quiet rows
    nothing; a scale per row keeps every row within a few percent."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 256, generator=g) * 10 ** torch.linspace(-3, 2, 64).unsqueeze(1)
    with torch.inference_mode():
        per_call = _row_errors(_quantized(linear)(x), linear, x)
        per_row = _row_errors(int8.RowScaledLinear(_quantized(linear))(x), linear, x)
    assert per_row.max() < 0.03, per_row.max()
    assert per_call.max() > 0.5, per_call.max()  # the premise: torch's own scale loses the quiet rows


def test_an_input_handed_over_is_divided_in_place_to_the_same_result(linear):
    """consumes_input: the caller's tensor is scaled in place (no copy), the product is the same; otherwise
    the input is left as it was. An all-zero row gives the bias (or zeros without one), not NaN."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 10, 256, generator=g)
    x[1, 4] = 0
    kept, handed = x.clone(), x.clone()
    with torch.inference_mode():
        copying = int8.RowScaledLinear(_quantized(linear))
        consuming = int8.RowScaledLinear(_quantized(linear), consumes_input=True)
        a, b = copying(kept), consuming(handed)
        assert torch.equal(kept, x) and not torch.equal(handed, x)
        assert torch.allclose(handed.abs().amax(-1)[x.abs().amax(-1) > 0], torch.tensor(1.0))
        assert torch.equal(a, b) and a.shape == (3, 10, 192)
        assert torch.allclose(a[1, 4], linear.bias)
        no_bias = nn.Linear(256, 192, bias=False)
        assert torch.equal(int8.RowScaledLinear(_quantized(no_bias))(x)[1, 4], torch.zeros(192))


def _small_whisper() -> network.Whisper:
    """A two-layer Whisper of random weights (d_model 64), float32."""
    torch.manual_seed(3)
    dims = network.Dims(n_mels=80, d_model=64, encoder_layers=2, encoder_heads=2, decoder_layers=2,
                        decoder_heads=2, encoder_ffn=256, decoder_ffn=256, n_audio_ctx=1500, n_text_ctx=448,
                        vocab_size=100)
    net = network.Whisper(dims).eval()
    with torch.no_grad():  # the network is built without initialising its weights (they come from a file)
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
        for norm in (m for m in net.modules() if isinstance(m, nn.LayerNorm)):
            norm.weight.fill_(1)
    return net


onednn = pytest.mark.skipif(not int8.onednn_int8_works(), reason="this torch has no working oneDNN int8 product")


@onednn
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_onednn_int8_linear_keeps_every_rows_precision_in_the_inputs_dtype(linear, dtype):
    """Int8Linear: rows 10^-3 to 10^2 in one call each within a few percent of float32 (in bfloat16: of what a
    plain bfloat16 linear loses), out in the input's dtype and shape; an all-zero row gives the bias, not NaN;
    no bias gives zeros there."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 32, 256, generator=g) * 10 ** torch.linspace(-3, 2, 32).unsqueeze(1)
    x[1, 7] = 0
    layer = int8.Int8Linear(linear).to(dtype)
    with torch.inference_mode():
        out = layer(x.to(dtype))
        assert out.dtype == dtype and out.shape == (2, 32, 192)
        errors = _row_errors(out.float(), linear, x.to(dtype).float())
        # in bfloat16 a quiet row's output rounds to the bias's 8 bits whatever the product: a plain bfloat16
        # linear loses as much there, so each row is held to 3% or twice that linear's own error
        plain = _row_errors(copy.deepcopy(linear).to(dtype)(x.to(dtype)).float(), linear, x.to(dtype).float())
        real = torch.ones_like(errors, dtype=torch.bool)
        real[1, 7] = False
        assert (errors <= torch.clamp(2 * plain, min=0.03))[real].all(), (errors - 2 * plain).max()
        assert torch.allclose(out[1, 7].float(), linear.bias.to(dtype).float())
        no_bias = nn.Linear(256, 192, bias=False)
        assert torch.equal(int8.Int8Linear(no_bias)(x)[1, 7], torch.zeros(192))
        # near the top of the range every value must survive: a product that rounds to 128 would wrap to -128
        top = torch.full((1, 256), 3.0).to(dtype)
        assert ((int8.Int8Linear(no_bias).to(dtype)(top).float() - no_bias(top.float())).norm()
                / no_bias(top.float()).norm()) < 0.03


@onednn
def test_quantize_linear_through_onednn_moves_the_rest_to_the_cpus_dtype():
    """Every linear but the vocabulary projection is an Int8Linear, the rest of the network in the dtype
    asked for (bfloat16 here); the encoder's output stays within a few percent of float32's, and a decoder step
    runs through it."""
    net = _small_whisper()
    reference = copy.deepcopy(net)
    linears = sum(isinstance(m, nn.Linear) for m in net.modules())
    assert int8.quantize_linear(net, torch.bfloat16) == "onednn"
    assert sum(isinstance(m, int8.Int8Linear) for m in net.modules()) == linears - 1
    assert type(net.proj_out) is nn.Linear and net.proj_out.weight.dtype == torch.bfloat16
    assert {p.dtype for p in net.parameters()} == {torch.bfloat16}
    mel = torch.randn(2, 80, 3000, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        ours, theirs = net.encode(mel.bfloat16()), reference.encode(mel)
        assert ours.dtype == torch.bfloat16
        assert ((ours.float() - theirs).norm() / theirs.norm()) < 0.05
        cache = net.new_cache(ours, max_tokens=8)
        logits = net.decode(torch.tensor([[1, 2, 3], [4, 5, 6]]), cache)
        want = reference.decode(torch.tensor([[1, 2, 3], [4, 5, 6]]), reference.new_cache(theirs, max_tokens=8))
    assert torch.isfinite(logits).all() and logits.shape == want.shape
    assert ((logits.float() - want).norm() / want.norm()) < 0.1


def test_torch_ao_fallback_scales_the_encoders_rows_and_leaves_the_rest_as_torch_does(monkeypatch):
    """The encoder's linears are RowScaledLinear (fc1 and fc2, whose inputs nothing else reads, divided in
    place), the decoder's are torch's own, the vocabulary projection stays float32; the encoder's output
    stays within a few percent of float32's. The path taken where oneDNN's int8 product is missing."""
    from torch.ao.nn.quantized.dynamic import Linear as QuantizedLinear

    net = _small_whisper()
    reference = copy.deepcopy(net)
    monkeypatch.setattr(int8, "onednn_int8_works", lambda: False)  # as on a torch without the op
    assert int8.quantize_linear(net, torch.bfloat16) == "torch.ao"
    encoder = dict(net.model.encoder.named_modules())
    scaled = {name: m for name, m in encoder.items() if isinstance(m, int8.RowScaledLinear)}
    assert len(scaled) == 2 * 6 and not any(isinstance(m, QuantizedLinear) for n, m in encoder.items()
                                            if n.rpartition(".")[0] not in scaled)
    assert {name.rpartition(".")[2] for name, m in scaled.items() if m.consumes_input} == {"fc1", "fc2"}
    decoder = [m for m in net.model.decoder.modules() if isinstance(m, (QuantizedLinear, int8.RowScaledLinear))]
    assert len(decoder) == 2 * 10 and all(isinstance(m, QuantizedLinear) for m in decoder)
    assert type(net.proj_out) is nn.Linear
    mel = torch.randn(2, 80, 3000, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        ours, theirs = net.encode(mel), reference.encode(mel)
    assert ((ours - theirs).norm() / theirs.norm()) < 0.05


def test_onednn_is_taken_only_where_the_cpu_lists_amx_int8(monkeypatch):
    """The rule before the probe: a CPU without AMX int8 keeps torch.ao (off AMX oneDNN's int8 product was
    not measured, and held below AMX it fell to a kernel 1000x slower)."""
    monkeypatch.setattr(int8, "cpu_flags", lambda: frozenset({"avx512f", "avx512_vnni", "avx512_bf16"}))
    int8.onednn_int8_works.cache_clear()
    try:
        assert int8.onednn_int8_works() is False
        net = _small_whisper()
        assert int8.quantize_linear(net, torch.bfloat16) == "torch.ao"
        assert not any(isinstance(m, int8.Int8Linear) for m in net.modules())
    finally:
        int8.onednn_int8_works.cache_clear()
