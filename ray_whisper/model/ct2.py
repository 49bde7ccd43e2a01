"""Read a CTranslate2 Whisper model.bin and map its variables to Whisper's parameter names: pure numpy.

The binary layout is written by ``ctranslate2/specs/model_spec.py`` (``ModelSpec._serialize``)::

    uint32 binary_version
    string spec_name; uint32 spec_revision            (binary_version >= 2)
    uint32 num_variables
      string name; uint8 rank; uint32 dims[rank]
      uint8 dtype_id; uint32 num_bytes; bytes          (binary_version >= 4)
      uint8 item_size; uint32 num_items; bytes         (binary_version < 4)
    uint32 num_aliases; (string alias, string target)* (binary_version >= 3)

where ``string`` is ``uint16 length-including-NUL`` followed by UTF-8 bytes and a NUL.
"""

from __future__ import annotations

import re
import struct
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ModelError

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
CT2_GELU = 3  # ctranslate2.specs.common_spec.Activation.GELU


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


def to_float32(variables: dict[str, np.ndarray], dtypes: dict[str, str], name: str) -> np.ndarray:
    """Return variable ``name`` as a float32 array, dequantizing int8/int16 weights with their scale."""
    value = variables[name]
    dtype = dtypes[name]
    if dtype == "bfloat16":
        return (value.astype(np.uint32) << 16).view(np.float32)
    if dtype in ("int8", "int16") and f"{name}_scale" in variables:
        # ctranslate2 quantizes as q = round(w * scale) with one scale per output row
        # (int8) or a single scalar (int16), so w = q / scale.
        scale = to_float32(variables, dtypes, f"{name}_scale")
        out = value.astype(np.float32)
        if scale.ndim == 0:
            return out / scale
        return out / scale.reshape((-1,) + (1,) * (out.ndim - 1))
    return value.astype(np.float32)



def scalar(variables: dict[str, np.ndarray], name: str, default: float | None = None) -> float:
    if name not in variables:
        if default is None:
            raise ModelError(f"CTranslate2 Whisper model is missing scalar {name!r}")
        return default
    return float(np.asarray(variables[name]).reshape(-1)[0])


def count_layers(variables: dict[str, np.ndarray], stack: str) -> int:
    pattern = re.compile(rf"^{stack}/layer_(\d+)/")
    indices = {int(m.group(1)) for name in variables if (m := pattern.match(name))}
    if not indices or indices != set(range(len(indices))):
        raise ModelError(f"CTranslate2 Whisper model has no (or non-contiguous) {stack} layers")
    return len(indices)


def whisper_state_dict(
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
        return np.ascontiguousarray(to_float32(variables, dtypes, name))

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
        if np.any(to_float32(variables, dtypes, "decoder/projection/bias") != 0):
            raise ModelError("CTranslate2 Whisper model has an output bias, which transformers Whisper lacks")

    leftovers = sorted(n for n in variables if n not in used and variables[n].ndim > 0)
    if leftovers:
        raise ModelError(f"unexpected CTranslate2 Whisper variables (unsupported layout): {leftovers[:8]}")
    return out, tie
