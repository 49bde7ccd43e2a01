"""Whisper's vocabulary as the decoder and the merge see it: control tokens and languages of any checkpoint,
the prompt that starts a chunk, and the timed segments in a chunk's decoded tokens. Pure: no torch.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..constants import SECONDS_PER_TOKEN
from ..model.checkpoint import Checkpoint
from ..languages import LANGUAGE_CODES, LANGUAGE_NAMES


@dataclass(frozen=True)
class SpecialTokens:
    """Whisper's control tokens in one checkpoint's vocabulary."""

    eot: int
    sot: int
    no_timestamps: int
    timestamp_begin: int  # <|0.00|>; timestamps follow in 20 ms steps
    no_speech: int
    transcribe: int
    translate: int
    languages: dict[str, int]  # "en" -> <|en|>; empty for English-only models
    suppress: tuple[int, ...]
    suppress_at_begin: tuple[int, ...]
    sot_prev: int | None = None  # <|startofprev|>: the prompt (earlier text) comes after it

    @property
    def multilingual(self) -> bool:
        return bool(self.languages)

    def prompt(self, language: str | None, task: str, timestamps: bool) -> list[int]:
        """The tokens that start a chunk: <|startoftranscript|>, then language and task for multilingual
        models, then <|notimestamps|> when decoding without timestamps."""
        ids = [self.sot]
        if self.multilingual:
            ids += [self.languages[language or "en"], self.translate if task == "translate" else self.transcribe]
        if not timestamps:
            ids.append(self.no_timestamps)
        return ids


def special_tokens(token_to_id: Any, generation: dict[str, Any], vocab_size: int) -> SpecialTokens:
    """Find Whisper's control tokens for any checkpoint.

    `token_to_id(str) -> int | None` looks a token up (None when unknown); `generation` is the
    checkpoint's generation_config.json as a dict ({} when it has none)."""

    def tok(name: str) -> int | None:
        i = token_to_id(name)
        return None if i is None else int(i)

    no_ts = tok("<|notimestamps|>")
    if no_ts is None:
        raise ValueError("tokenizer has no <|notimestamps|> token: this is not a Whisper tokenizer")
    multilingual = vocab_size >= 51865  # English-only vocabularies are 51864 tokens
    languages: dict[str, int] = {}
    if multilingual:
        lang_to_id = generation.get("lang_to_id") or {}
        languages = {k.strip("<|>"): int(v) for k, v in lang_to_id.items()}
        if not languages:
            languages = {code: i for code in LANGUAGE_CODES if (i := tok(f"<|{code}|>")) is not None}
    no_speech = tok("<|nospeech|>") or tok("<|nocaptions|>") or no_ts - 1
    return SpecialTokens(
        eot=_required(tok, "<|endoftext|>"),
        sot=_required(tok, "<|startoftranscript|>"),
        no_timestamps=no_ts,
        timestamp_begin=no_ts + 1,  # true of every Whisper vocabulary, whether or not the tokenizer lists them
        no_speech=no_speech,
        transcribe=_required(tok, "<|transcribe|>"),
        translate=_required(tok, "<|translate|>"),
        languages=languages,
        suppress=tuple(generation.get("suppress_tokens") or ()),
        suppress_at_begin=tuple(generation.get("begin_suppress_tokens") or ()),
        sot_prev=tok("<|startofprev|>"),
    )


def checkpoint_tokens(checkpoint: Checkpoint) -> SpecialTokens:
    """The control tokens and languages of a checkpoint (special_tokens over its tokenizer and configs)."""
    return special_tokens(checkpoint.tokenizer.token_to_id, checkpoint.generation, checkpoint.vocab_size)


def detects_file_language(tokens: SpecialTokens, language: str | None, per_chunk: bool) -> bool:
    """Whether each file's language is detected once, on its first chunk with sound, and its other chunks are
    decoded in it: a multilingual model, no language given, and not --language-per-chunk."""
    return tokens.multilingual and not language and not per_chunk


def _required(tok: Any, name: str) -> int:
    i = tok(name)
    if i is None:
        raise ValueError(f"tokenizer has no {name} token: this is not a Whisper tokenizer")
    return i


def language_code(language: str | None, tokens: SpecialTokens) -> str | None:
    """Normalise 'English' / 'en' to 'en'; raise ValueError saying what to give instead."""
    if language is None:
        return None
    code = LANGUAGE_NAMES.get(language.lower(), language.lower())
    if code not in LANGUAGE_CODES:
        raise ValueError(
            f"unknown language {language!r}: Whisper knows codes such as {', '.join(LANGUAGE_CODES[:10])} "
            "(or names such as English, German); leave it unset to detect the language"
        )
    if not tokens.multilingual:
        if code != "en":
            raise ValueError(
                f"language {language!r} needs a multilingual model; this one is English-only "
                "(give a multilingual --model such as openai/whisper-base)"
            )
        return "en"
    if code not in tokens.languages:
        raise ValueError(f"this model has no {code!r} language token; it knows {', '.join(list(tokens.languages)[:12])}, ...")
    return code


def segments_from_tokens(tokens: list[int], special: SpecialTokens, duration: float, timestamps: bool):
    """Split one chunk's generated tokens into (start_s, end_s, text tokens) relative to the chunk.

    With timestamps, text between an opening and a closing timestamp is a segment; text after the last
    timestamp (the chunk ended mid-segment) runs to the end of the chunk. Without, the chunk is one segment.
    """
    ts = special.timestamp_begin
    if not timestamps:
        text = [t for t in tokens if t < special.eot]
        return [(0.0, duration, text)] if text else []
    out: list[tuple[float, float, list[int]]] = []
    start: float | None = None
    text: list[int] = []
    for t in tokens:
        if t >= ts:
            time = min((t - ts) * SECONDS_PER_TOKEN, duration)
            if text:
                out.append((start if start is not None else 0.0, max(time, start or 0.0), text))
                text = []
                start = None
            else:
                start = time
        elif t < special.eot:
            text.append(t)
    if text:
        out.append((start if start is not None else 0.0, duration, text))
    return out


def vote_language(languages: Sequence[str | None]) -> str | None:
    """The language most chunks of a file were decoded in."""
    counts = Counter(lang for lang in languages if lang)
    return counts.most_common(1)[0][0] if counts else None
