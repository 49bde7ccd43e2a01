"""The model stage: a callable class for `map_batches` that keeps Whisper resident on its device.

As in Ray's batch-inference examples: the model loads once in `__init__`, and `__call__` maps one batch of
chunk rows (schema.CHUNK_SCHEMA) to token rows (schema.TOKEN_COLUMNS). Chunks of many files share a batch.
It can be tried without a cluster: `Transcriber(...)(ds.take_batch(16))`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import math
from collections import OrderedDict
from typing import Any

import numpy as np
import tokenizers
import torch

from . import features
from ..model import network
from .. import schema
from ..config import DecodingOptions
from ..constants import SAMPLE_RATE
from .alignment import WordAligner
from .decoding import Decoder
from ..errors import MODEL_ERROR, row_error
from ..model.checkpoint import local_model_dir, model_files
from .transcribe import ChunkTranscript, transcribe_chunks
from .tokens import language_code, special_tokens
from ..model.runtime import (ModelThread, cross_attention_dtype, keep_freed_memory, quantize_linear, resolve_dtype,
                     run_at_normal_priority)

log = logging.getLogger(__name__)

FILE_LANGUAGES = 4096  # files whose detected language a model actor remembers


class Transcriber:
    """map_batches callable: loads Whisper once per actor, then turns chunk rows into token rows."""

    def __init__(self, model_path: str, options: DecodingOptions, cpu_threads: int | None = None):
        """`model_path` is a resolved model (model.resolve_model); `cpu_threads` the torch threads when the
        actor runs on CPU (resources.plan_resources chooses them). The model loads and runs on one thread of
        its own (`self.thread`, tuning.ModelThread), whichever thread constructs or calls this."""
        self.options = options
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if not run_at_normal_priority():  # before the model thread starts: threads inherit their creator's
            log.info("model actor runs at Ray's worker niceness (lowering it was refused)")
        self.thread = ModelThread()
        self.thread.run(self._load, model_path, cpu_threads)

    def _load(self, model_path: str, cpu_threads: int | None) -> None:
        options = self.options
        if self.device == "cpu":
            torch.set_num_threads(cpu_threads or 1)
            keep_freed_memory()
        dtype = resolve_dtype(options.dtype, self.device)
        config, generation, tokenizer_json = model_files(model_path, options.revision)
        self.tokenizer = tokenizers.Tokenizer.from_str(tokenizer_json)
        self.tokens = special_tokens(self.tokenizer.token_to_id, generation, int(config["vocab_size"]))
        self.net = network.load(local_model_dir(model_path, options.revision), self.device, dtype)
        if options.dtype == "int8":
            quantize_linear(self.net)
        self.net.cross_dtype = cross_attention_dtype(self.device, dtype)
        self.n_mels = self.net.dims.n_mels
        dims = self.net.dims  # without heads in the checkpoint: every head of the decoder's second half
        self.alignment_heads = generation.get("alignment_heads") or [
            [layer, head] for layer in range(dims.decoder_layers // 2, dims.decoder_layers) for head in range(dims.decoder_heads)
        ]
        self._variants: dict[tuple, tuple[Decoder, WordAligner | None]] = {}
        self.decoder, self.aligner = self.variant()
        self.file_languages: OrderedDict[str, tuple[str, float]] = OrderedDict()  # file id -> (language, prob)
        log.info("model %s loaded on %s (%s)", model_path, self.device, dtype)

    def variant(self, **changes: Any) -> tuple[Decoder, WordAligner | None]:
        """A decoder (and word aligner, with word timestamps) for these decoding options changed, over the same
        resident network: the endpoint decodes each request with its own task, temperatures and words."""
        key = tuple(sorted(changes.items()))
        if key not in self._variants:
            options = dataclasses.replace(self.options, **changes)
            aligner = WordAligner(self.net, self.tokens, self.alignment_heads, options.task, self._text) \
                if options.word_timestamps else None
            self._variants[key] = (Decoder(self.net, self.tokens, options), aligner)
        return self._variants[key]

    def decode(self, feats: np.ndarray, languages: list[str | int | None], durations: list[float],
               prompts: list[str | None] | None = None, seeds: list[int] | None = None) -> list[ChunkTranscript]:
        """Chunks' features (chunks, n_mels, 3000), and per chunk its language (None: the options', else
        detect; an index: that chunk's), length in seconds, prompt text (None: --initial-prompt) and sampling
        seed -> timed segments."""
        requested = [lang if isinstance(lang, int) else language_code(lang or self.options.language, self.tokens)
                     for lang in languages]
        texts = prompts or [None] * len(durations)
        prompt_ids = [self._prompt_ids(text or self.options.initial_prompt) for text in texts]
        return self.thread.run(transcribe_chunks, self.decoder, feats, requested, durations, self._text, prompt_ids,
                               seeds, self.aligner)

    def _text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    @functools.lru_cache(maxsize=256)  # noqa: B019 - one actor, a bounded cache of the prompts it has seen
    def _prompt_ids(self, text: str | None) -> list[int] | None:
        """A prompt's tokens, as Whisper encodes it: with a leading space, no special tokens."""
        if not text or not text.strip():
            return None
        return self.tokenizer.encode(" " + text.strip(), add_special_tokens=False).ids

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        return self.thread.run(self._map, batch)

    def _map(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        schema.require(batch, schema.MODEL_INPUT, "model")
        n = len(batch[schema.ID])
        errors = list(batch[schema.ERROR])
        # nulls arrive as None or NaN; chunks without features were found silent by the CPU stage
        todo = [i for i in range(n) if not _is_text(errors[i]) and len(batch[schema.FEATURES][i])]
        results: dict[int, ChunkTranscript] = {}
        if todo:
            feats = features.from_bytes([batch[schema.FEATURES][i] for i in todo], self.n_mels)
            durations = [(int(batch[schema.END][i]) - int(batch[schema.START][i])) / SAMPLE_RATE for i in todo]
            prompts = [p if _is_text(p) else None for p in (batch[schema.PROMPT][i] for i in todo)]
            seeds = [chunk_seed(str(batch[schema.ID][i]), int(batch[schema.CHUNK_INDEX][i])) for i in todo]
            try:
                languages, known = self._file_languages(batch, todo)
                decoded = self.decode(feats, languages, durations, prompts, seeds)
                self._remember(batch, todo, decoded, known)
                results = dict(zip(todo, decoded))
            except Exception as e:  # a batch-level model failure must not lose rows: report it per chunk
                log.exception("model failed on a batch of %d chunks", len(todo))
                for i in todo:
                    errors[i] = row_error(MODEL_ERROR, f"{type(e).__name__}: {e}")
        return token_rows(batch, results, errors)

    def _file_languages(self, batch: dict[str, np.ndarray], todo: list[int]) -> tuple[list[str | int | None], dict[int, float]]:
        """Each chunk's language request: its row's, else its file's (detected once, on the file's detection
        chunk: known to this actor already, decoded in this batch, or detected now from the features the row
        carries), else None (detected per chunk). Also the probabilities of the languages known before."""
        out: list[str | int | None] = []
        known: dict[int, float] = {}
        in_batch: dict[str, int] = {}
        probe: dict[str, bytes] = {}
        for k, i in enumerate(todo):
            lang, file_id, index = batch[schema.LANGUAGE][i], str(batch[schema.ID][i]), int(batch[schema.CHUNK_INDEX][i])
            detect_at = int(batch[schema.DETECT_INDEX][i])
            out.append(lang if _is_text(lang) else None)
            if _is_text(lang) or detect_at < 0:
                continue
            if index == detect_at:
                in_batch[file_id] = k
            elif file_id not in self.file_languages:
                probe[file_id] = batch[schema.DETECT_FEATURES][i]
        probe = {f: blob for f, blob in probe.items() if f not in in_batch}
        if probe:  # files whose detection chunk went to another actor or an earlier batch this actor never saw
            found = self.decoder.detect(features.from_bytes(list(probe.values()), self.n_mels))
            for file_id, result in zip(probe, found):
                self._keep(file_id, result)
        for k, i in enumerate(todo):
            file_id, detect_at = str(batch[schema.ID][i]), int(batch[schema.DETECT_INDEX][i])
            if out[k] is not None or detect_at < 0 or int(batch[schema.CHUNK_INDEX][i]) == detect_at:
                continue
            if file_id in in_batch:
                out[k] = in_batch[file_id]
            else:
                out[k], known[k] = self.file_languages[file_id]
        return out, known

    def _remember(self, batch: dict[str, np.ndarray], todo: list[int], decoded: list[ChunkTranscript],
                  known: dict[int, float]) -> None:
        """Keep the languages detected on detection chunks; give the rows that took a known language its
        probability."""
        for k, (i, result) in enumerate(zip(todo, decoded)):
            if k in known:
                result.language_prob = known[k]
            elif int(batch[schema.CHUNK_INDEX][i]) == int(batch[schema.DETECT_INDEX][i]):
                self._keep(str(batch[schema.ID][i]), (result.language, result.language_prob))

    def _keep(self, file_id: str, language: tuple[str, float]) -> None:
        self.file_languages[file_id] = language
        self.file_languages.move_to_end(file_id)
        while len(self.file_languages) > FILE_LANGUAGES:
            self.file_languages.popitem(last=False)


def chunk_seed(file_id: str, index: int) -> int:
    """The sampling seed of a chunk: the same on every run and in every batch."""
    return int.from_bytes(hashlib.sha256(f"{file_id}\0{index}".encode()).digest()[:4], "little")


def token_rows(batch: dict[str, Any], results: dict[int, ChunkTranscript], errors: list[Any]) -> dict[str, Any]:
    """Token rows (schema.TOKEN_COLUMNS): the batch's chunk rows with the segments decoded for them."""
    n = len(batch[schema.ID])
    empty = ChunkTranscript([], None, math.nan, math.nan)  # type: ignore[arg-type]
    rows = [results.get(i, empty) for i in range(n)]
    passed = {name: batch[name] for name in schema.TOKEN_COLUMNS if name in batch}
    language = [r.language or (x if _is_text(x) else None) for r, x in zip(rows, batch[schema.LANGUAGE])]
    return passed | {
        schema.LANGUAGE: np.array(language, dtype=object),
        schema.ERROR: np.array([e if _is_text(e) else None for e in errors], dtype=object),
        schema.SEG_START: [[s for s, _, _ in r.segments] for r in rows],
        schema.SEG_END: [[e for _, e, _ in r.segments] for r in rows],
        schema.SEG_TOKENS: [[t for _, _, t in r.segments] for r in rows],
        schema.NO_SPEECH_PROB: np.array([r.no_speech_prob for r in rows]),
        schema.AVG_LOGPROB: np.array([r.avg_logprob for r in rows]),
        schema.LANGUAGE_PROB: np.array([r.language_prob for r in rows]),
        schema.SEG_WORDS: [_word_lists(r) for r in rows],
    }


def _word_lists(result: ChunkTranscript) -> list[list[dict[str, Any]]]:
    """Per segment, its words (chunk-relative times); empty lists without word timestamps."""
    if result.words is None:
        return [[] for _ in result.segments]
    return [[{"word": w.word, "start": w.start, "end": w.end, "probability": w.probability, "tokens": w.tokens}
             for w in words] for words in result.words]


def _is_text(value: Any) -> bool:
    """A set string; null strings arrive as None or NaN depending on the batch format."""
    return isinstance(value, str) and bool(value)
