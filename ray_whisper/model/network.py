"""Whisper's network in plain PyTorch: the encoder, and a decoder that runs a step at a time over a
key/value cache that can drop rows.

It holds the same parameters under the same names as transformers' `WhisperForConditionalGeneration`
and does the same arithmetic (tests/test_network.py compares the two on real speech), so any
transformers Whisper checkpoint loads into it. Why not use transformers' module directly:
- start-up: importing transformers' Whisper modeling code takes ~4.5 s of CPU in every model actor (more
  than loading tiny's weights 20 times over); this module needs only torch;
- the decoder (decoding.py) drops rows as they end (their caches included), shares each chunk's
  cross-attention keys and values between its beams, and knows its cache is plain tensors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .kv_cache import DecoderCache
from .checkpoint import WEIGHT_FILES



@dataclass(frozen=True)
class Dims:
    n_mels: int
    d_model: int
    encoder_layers: int
    encoder_heads: int
    decoder_layers: int
    decoder_heads: int
    encoder_ffn: int
    decoder_ffn: int
    n_audio_ctx: int  # 1500 encoder positions for 30 s
    n_text_ctx: int  # 448 decoder positions
    vocab_size: int

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Dims:
        """From a transformers Whisper config.json (as a dict)."""
        activation = config.get("activation_function", "gelu")
        if activation != "gelu":
            raise ValueError(f"unsupported activation_function {activation!r} (Whisper uses 'gelu')")
        return cls(
            n_mels=int(config.get("num_mel_bins", 80)),
            d_model=int(config["d_model"]),
            encoder_layers=int(config["encoder_layers"]),
            encoder_heads=int(config["encoder_attention_heads"]),
            decoder_layers=int(config["decoder_layers"]),
            decoder_heads=int(config["decoder_attention_heads"]),
            encoder_ffn=int(config["encoder_ffn_dim"]),
            decoder_ffn=int(config["decoder_ffn_dim"]),
            n_audio_ctx=int(config.get("max_source_positions", 1500)),
            n_text_ctx=int(config.get("max_target_positions", 448)),
            vocab_size=int(config["vocab_size"]),
        )


def _embedding(n: int, d: int) -> nn.Embedding:
    """An embedding whose weight is left uninitialised (a checkpoint's, or random_init's, fills it).
    nn.Embedding's own initialisation is normal_(), which on the meta device that `from_state_dict` builds
    on imports torch._dynamo: ~1.7 s of every model actor's start."""
    return nn.Embedding(n, d, _weight=torch.empty(n, d))


class Attention(nn.Module):
    def __init__(self, d_model: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, time, d_model) -> (batch, heads, time, head_dim)"""
        b, t, _ = x.shape
        return x.view(b, t, self.heads, -1).transpose(1, 2)

    def keys_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.split(self.k_proj(x)), self.split(self.v_proj(x))

    def attend(self, q_in: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
               group: int = 1, decoder: bool = False, in_float32: bool = False) -> torch.Tensor:
        """Attention of q_in's rows over k, v. With `group` > 1, each run of `group` rows of q_in (the beams
        of one chunk) attends over one row of k, v: their queries are stacked into that row's query sequence,
        so the beams of a chunk share its cross-attention keys and values instead of holding copies."""
        q = self.split(self.q_proj(q_in))
        rows, heads, t, d = q.shape
        if group > 1:
            q = q.view(rows // group, group, heads, t, d).transpose(1, 2).reshape(rows // group, heads, group * t, d)
        if decoder and q.device.type == "cpu":
            out = _attend_decoder(q, k, v, mask, in_float32)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        if group > 1:
            out = out.view(rows // group, heads, group, t, d).transpose(1, 2).reshape(rows, heads, t, d)
        return self.out_proj(out.transpose(1, 2).reshape(rows, t, -1))


    def weights(self, q_in: torch.Tensor, k: torch.Tensor, heads: list[int]) -> torch.Tensor:
        """The attention probabilities of some heads, (batch, len(heads), t, keys): what `attend` computes
        inside scaled_dot_product_attention, made explicit where the weights themselves are wanted."""
        q = self.split(self.q_proj(q_in))[:, heads]
        scale = q.shape[-1] ** -0.5
        return (q @ k[:, heads].transpose(-1, -2) * scale).float().softmax(-1)


def _attend_decoder(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                    in_float32: bool = False) -> torch.Tensor:
    """scaled_dot_product_attention for the decoder on CPU, above all its steps: one query per row (or a chunk's
    beams) over up to 1500 keys. PyTorch's CPU kernel (flash attention) tiles the queries and runs its small
    products one block at a time; for so few queries that is far below the speed of reading the keys. Here the
    scores and the weighted sum are each one batched product.
    Measured on 2 AMD EPYC cores (AVX512-BF16), 16 rows x 6 heads x 1 query over 1500 keys: bfloat16 8.9 ms ->
    1.5 ms, float32 3.2 -> 2.9 ms; a tiny.en decoder step at batch 16 in bfloat16 45 -> 15 ms
    (docs/performance.md#the-attention-of-a-decoder-step). The decoder's prompts (up to 224 queries, once per
    chunk) go the same way, so that a row decodes through the same arithmetic whatever the prompts of the rows
    beside it (a row padded to a longer prompt must decode as it would alone); the encoder keeps torch's kernel,
    the faster for 1500 queries.

    The scores come out of the product in q's dtype: in bfloat16 each is rounded to 3 significant digits, where
    torch's kernel keeps them in float32. `in_float32` computes in float32 instead: the self-attention asks it
    (its cache is float32 on CPU, so a row's start does not hang on the padding or the queries beside it, and
    a step's products of a new length each time stay cheap); the cross-attention of a step stays in the
    model's dtype, and a prompt's in float32. In a bfloat16 model the WER stayed the same on the benchmark's
    three corpora (docs/performance.md)."""
    if in_float32 and q.dtype != torch.float32:
        return _attend_decoder(q.float(), k.float(), v.float(), mask).to(q.dtype)
    scores = torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-1, -2))
    if mask is not None:
        # the dtype's lowest, not -inf: a query that sees no key (a row's left padding) gets finite weights, where
        # -inf would give NaN, which the padding's keys and values would carry into the rows' real tokens
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return torch.matmul(scores.softmax(-1), v)  # a bfloat16 softmax is computed in float32 inside


class EncoderLayer(nn.Module):
    TEMPORARY_INPUTS = ("fc1", "fc2")  # linears whose input nothing else reads (int8.RowScaledLinear divides it)

    def __init__(self, d_model: int, heads: int, ffn: int):
        super().__init__()
        self.self_attn = Attention(d_model, heads)
        self.self_attn_layer_norm = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, ffn)
        self.fc2 = nn.Linear(ffn, d_model)
        self.final_layer_norm = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.self_attn_layer_norm(x)
        x = x + self.self_attn.attend(h, *self.self_attn.keys_values(h))
        return x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))


class DecoderLayer(nn.Module):
    def __init__(self, d_model: int, heads: int, ffn: int):
        super().__init__()
        self.self_attn = Attention(d_model, heads)
        self.self_attn_layer_norm = nn.LayerNorm(d_model)
        self.encoder_attn = Attention(d_model, heads)
        self.encoder_attn_layer_norm = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, ffn)
        self.fc2 = nn.Linear(ffn, d_model)
        self.final_layer_norm = nn.LayerNorm(d_model)


class Encoder(nn.Module):
    def __init__(self, d: Dims):
        super().__init__()
        self.conv1 = nn.Conv1d(d.n_mels, d.d_model, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(d.d_model, d.d_model, kernel_size=3, stride=2, padding=1)
        self.embed_positions = _embedding(d.n_audio_ctx, d.d_model)
        self.layers = nn.ModuleList(EncoderLayer(d.d_model, d.encoder_heads, d.encoder_ffn) for _ in range(d.encoder_layers))
        self.layer_norm = nn.LayerNorm(d.d_model)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        """(batch, n_mels, 3000) log-mel -> (batch, 1500, d_model)"""
        x = F.gelu(self.conv2(F.gelu(self.conv1(mel)))).transpose(1, 2)
        if x.shape[1] != self.embed_positions.num_embeddings:
            raise ValueError(f"Whisper expects 30 s of features ({2 * self.embed_positions.num_embeddings} frames), "
                             f"got {mel.shape[-1]}")
        x = x + self.embed_positions.weight
        for layer in self.layers:
            x = layer(x)
        return self.layer_norm(x)


class Decoder(nn.Module):
    def __init__(self, d: Dims):
        super().__init__()
        self.embed_tokens = _embedding(d.vocab_size, d.d_model)
        self.embed_positions = _embedding(d.n_text_ctx, d.d_model)
        self.layers = nn.ModuleList(DecoderLayer(d.d_model, d.decoder_heads, d.decoder_ffn) for _ in range(d.decoder_layers))
        self.layer_norm = nn.LayerNorm(d.d_model)


class _Body(nn.Module):
    """Only here so that parameter names match transformers' ("model.encoder.…", "model.decoder.…")."""

    def __init__(self, d: Dims):
        super().__init__()
        self.encoder = Encoder(d)
        self.decoder = Decoder(d)


class Whisper(nn.Module):
    def __init__(self, dims: Dims):
        super().__init__()
        self.dims = dims
        self.model = _Body(dims)
        self.proj_out = nn.Linear(dims.d_model, dims.vocab_size, bias=False)
        self.proj_out.weight = self.model.decoder.embed_tokens.weight  # tied, as in every Whisper checkpoint
        self._packed: tuple[Any, Any] = (None, None)  # (proj_out weight's identity, its oneDNN layout or None)

    def encode(self, mel: torch.Tensor) -> torch.Tensor:
        return self.model.encoder(mel)

    def new_cache(self, encoded: torch.Tensor, max_tokens: int, group: int = 1,
                  offsets: torch.Tensor | None = None) -> DecoderCache:
        """A cache for decoding `encoded` (chunks, 1500, d_model), `group` rows (beams) per chunk; `offsets`
        (one per row) is the left padding of rows whose prefix is shorter than the longest."""
        dec = self.model.decoder
        b = encoded.shape[0] * group
        heads = self.dims.decoder_heads
        head_dim = self.dims.d_model // heads
        max_tokens = min(max_tokens, self.dims.n_text_ctx)
        # on CPU the self-attention keeps its keys and values in float32 whatever the model's dtype: its key
        # length grows every step, and oneDNN builds a new bfloat16 product for every new shape (~0.6 ms each,
        # 8 per step), where float32's small products cost microseconds (docs/performance.md)
        own = torch.float32 if encoded.device.type == "cpu" else encoded.dtype
        self_kv = [
            tuple(encoded.new_empty(b, heads, max_tokens, head_dim, dtype=own) for _ in range(2))
            for _ in dec.layers
        ]
        # contiguous: every decoder step reads all of them (attention over a transposed view is ~25% slower on CPU)
        cross_kv = [tuple(t.contiguous() for t in layer.encoder_attn.keys_values(encoded))
                    for layer in dec.layers]
        return DecoderCache(self_kv, cross_kv, group, offsets)

    def decode(self, tokens: torch.Tensor, cache: DecoderCache, every_position: bool = False,
               attention_heads: list[tuple[int, int]] | None = None) -> Any:
        """Feed (batch, n) tokens after those already in `cache` and advance it by n; returns float32 logits
        of the last position, (batch, vocab), or of every position, (batch, n, vocab). With `attention_heads`
        ((layer, head) pairs) also the cross-attention weights of those heads: (logits, (batch, heads, n, 1500))."""
        dec = self.model.decoder
        start, n = cache.length, tokens.shape[1]
        end = start + n
        if end > cache.capacity:
            raise ValueError(f"decoder cache holds {cache.capacity} tokens; asked for {end}")
        x, mask = self._embed(tokens, cache)
        weights: dict[tuple[int, int], torch.Tensor] = {}
        for index, (layer, (k_cache, v_cache), (k_cross, v_cross)) in enumerate(zip(dec.layers, cache.self_kv, cache.cross_kv)):
            h = layer.self_attn_layer_norm(x)
            k, v = layer.self_attn.keys_values(h)
            k_cache[:, :, start:end] = k
            v_cache[:, :, start:end] = v
            x = x + layer.self_attn.attend(h, k_cache[:, :, :end], v_cache[:, :, :end], mask, decoder=True,
                                         in_float32=True)  # its cache is float32 on CPU (new_cache)
            h = layer.encoder_attn_layer_norm(x)
            heads = [hd for ly, hd in attention_heads or () if ly == index]
            if heads:
                weights.update(zip([(index, hd) for hd in heads], layer.encoder_attn.weights(h, k_cross, heads).unbind(1)))
            x = x + layer.encoder_attn.attend(h, k_cross, v_cross, group=cache.group, decoder=True,
                                            in_float32=n > 1)
            x = x + layer.fc2(F.gelu(layer.fc1(layer.final_layer_norm(x))))
        cache.length = end
        logits = self.vocabulary_logits(dec.layer_norm(x if every_position else x[:, -1])).float()
        if attention_heads is None:
            return logits
        return logits, torch.stack([weights[pair] for pair in attention_heads], dim=1)

    def _embed(self, tokens: torch.Tensor, cache: DecoderCache) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Token and position embeddings of (rows, n) new tokens, and the self-attention mask they need.

        Rows whose prefix is shorter than the longest in the batch (a shorter prompt) are padded on the left:
        `cache.offsets` says by how much. Their positions count from their first real token and the padding
        is masked out of attention, so each row decodes as it would alone."""
        dec = self.model.decoder
        start, n = cache.length, tokens.shape[1]
        end = start + n
        if cache.offsets is None:
            mask = None
            if n > 1:  # a prompt: each new token sees the cache and the new tokens up to itself
                mask = torch.ones(n, end, dtype=torch.bool, device=tokens.device).tril(diagonal=start)
            return dec.embed_tokens(tokens) + dec.embed_positions.weight[start:end], mask
        offsets = cache.offsets[: tokens.shape[0], None]
        positions = (torch.arange(start, end, device=tokens.device)[None, :] - offsets).clamp_(min=0)
        keys = torch.arange(end, device=tokens.device)[None, None, :]
        visible = keys >= offsets[:, :, None]  # (rows, 1, end): never the padding
        if n > 1:
            visible = visible & (keys <= torch.arange(start, end, device=tokens.device)[None, :, None])
        return dec.embed_tokens(tokens) + dec.embed_positions.weight[positions], visible[:, None]

    def vocabulary_logits(self, h: torch.Tensor) -> torch.Tensor:
        """proj_out(h). On CPU in float32 or bfloat16, through a copy of the weight laid out for oneDNN's matrix
        product when this torch has it: MKL's product of a few rows by the (vocab, d_model) matrix runs far
        below the memory's speed on some CPUs (tiny, 16 rows, 2 AMD cores: 22 ms; packed: 8 ms; 3 rows: 28 ms
        vs 4.6 ms). In bfloat16 (2 AMD EPYC cores with AVX512-BF16, 16 rows): 3.9 ms, packed 2.1 ms, of a
        decoder step's 16 ms (benchmarks/attention.py)."""
        packed = self._packed_out(h)
        if packed is None:
            return self.proj_out(h)
        return torch.ops.mkldnn._linear_pointwise(h, packed, None, "none", [], "")

    def _packed_out(self, h: torch.Tensor) -> Any:
        w = self.proj_out.weight
        if h.device.type != "cpu" or h.dtype not in PACKED_DTYPES or w.dtype != h.dtype or h.dim() != 2:
            return None
        key = (w.data_ptr(), w.shape)
        if self._packed[0] != key:
            self._packed = (key, pack_for_onednn(w))
        return self._packed[1]


PACKED_DTYPES = (torch.float32, torch.bfloat16)


def pack_for_onednn(w: torch.Tensor) -> Any:
    """`w` reordered for torch.ops.mkldnn._linear_pointwise (an internal op that torch.compile uses), or
    None where this torch lacks it or it disagrees with F.linear on a probe."""
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 16)
        probe = torch.randn(3, w.shape[1], generator=torch.Generator().manual_seed(0)).to(w.dtype)
        got = torch.ops.mkldnn._linear_pointwise(probe, packed, None, "none", [], "")
    except (AttributeError, RuntimeError, TypeError):  # missing op, unsupported CPU, changed signature
        return None
    want = F.linear(probe.float(), w.float())
    error = float((got.float() - want).norm() / want.norm())
    return packed if error < (1e-5 if w.dtype == torch.float32 else 1e-2) else None


def read_config(model_dir: Path) -> dict[str, Any]:
    return json.loads((model_dir / "config.json").read_text(encoding="utf-8"))


def _weight_files(model_dir: Path) -> list[Path]:
    for name in WEIGHT_FILES:
        f = model_dir / name
        if f.is_file():
            if name.endswith(".index.json"):
                shards = sorted(set(json.loads(f.read_text(encoding="utf-8"))["weight_map"].values()))
                return [model_dir / s for s in shards]
            return [f]
    raise FileNotFoundError(f"{model_dir} holds none of {', '.join(WEIGHT_FILES)}")


def read_state_dict(model_dir: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors under WhisperForConditionalGeneration's names (a bare WhisperModel's
    "encoder.…" keys get the "model." prefix)."""
    state: dict[str, torch.Tensor] = {}
    for f in _weight_files(model_dir):
        if f.suffix == ".safetensors":
            from safetensors.torch import load_file

            state.update(load_file(str(f)))
        else:
            state.update(torch.load(str(f), map_location="cpu", weights_only=True))
    return {(k if k.startswith(("model.", "proj_out.")) else f"model.{k}"): v for k, v in state.items()}


def load(model_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Whisper:
    """The network of a local transformers Whisper directory, in eval mode, on `device` in `dtype`."""
    model_dir = Path(model_dir)
    net = from_state_dict(read_config(model_dir), read_state_dict(model_dir), where=str(model_dir))
    return net.to(device=device, dtype=dtype)


def from_state_dict(config: dict[str, Any], state: dict[str, torch.Tensor], where: str = "checkpoint") -> Whisper:
    """The network over these tensors (not copied: a transformers model's state_dict() shares its weights)."""
    state = dict(state)
    untied = state.pop("proj_out.weight", None)
    with torch.device("meta"):
        net = Whisper(Dims.from_config(config))
    missing, unexpected = net.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if k != "proj_out.weight"]
    if missing or unexpected:
        raise ValueError(f"{where} is not a Whisper checkpoint of the shape its config.json gives: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    net.proj_out.weight = net.model.decoder.embed_tokens.weight
    if untied is not None and untied.data_ptr() != net.proj_out.weight.data_ptr() and not torch.equal(untied, net.proj_out.weight):
        net.proj_out.weight = nn.Parameter(untied, requires_grad=False)
    return net.eval().requires_grad_(False)


def random_init(config: dict[str, Any], device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                seed: int = 0) -> Whisper:
    """A network of a config's shape with random weights (PyTorch's default initialisation), for speed
    measurements of models that cannot be downloaded."""
    torch.manual_seed(seed)
    with torch.device(device):
        net = Whisper(Dims.from_config(config))
    for module in net.modules():
        if isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight)  # nn.Embedding's default, which _embedding leaves out
    return net.to(dtype=dtype).eval().requires_grad_(False)
