"""The engine: Whisper resident on one device, the one object that the batch job's model stage, the endpoint
and the evaluation helpers call.

It loads a checkpoint once, on a thread of its own (model.runtime.ModelThread), and turns chunks (their
log-mel features, and per chunk its language, length, prompt and sampling seed) into typed results
(merge.ChunkTranscript: timed segments of tokens, words, language). Everything runs on its model thread,
whichever thread calls: `run` waits for a call, `submit` hands back its future for asyncio callers.
Adapters turn their own inputs into these (batch.model_stage: columns; serve.app: uploads).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any, TypeVar

import numpy as np
import torch

from ..config import DecodingOptions
from ..model import network
from ..model.checkpoint import Checkpoint
from ..model.int8 import quantize_linear
from ..model.runtime import (ModelThread, auto_cpu_dtype, cpu_flags, keep_freed_memory, pack_linears,
                             resolve_dtype, run_at_normal_priority)
from . import features
from .alignment import WordAligner
from .decoding import Decoder
from .merge import ChunkTranscript
from .tally import Tally
from .tokens import checkpoint_tokens, language_code
from .transcribe import transcribe_chunks

log = logging.getLogger(__name__)

T = TypeVar("T")
Language = str | int | None  # a code or name; an int: the language detected for that chunk of the same call; None: detect


class Engine:
    """Whisper loaded once on this process's device (CUDA when there is one), decoding batches of chunks."""

    def __init__(self, model_path: str, options: DecodingOptions, cpu_threads: int | None = None):
        """`model_path` is a resolved model (model.checkpoint.resolve_model); `cpu_threads` the torch threads on
        CPU (model.resources chooses them). Loads on the model thread."""
        self.options = options
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if not run_at_normal_priority():  # before the model thread starts: threads inherit their creator's
            log.info("the model runs at Ray's worker niceness (lowering it was refused)")
        self._thread = ModelThread()
        self._thread.run(self._load, model_path, cpu_threads)

    def _load(self, model_path: str, cpu_threads: int | None) -> None:
        options = self.options
        if self.device == "cpu":
            torch.set_num_threads(cpu_threads or 1)
            keep_freed_memory()
        dtype = resolve_dtype(options.dtype, self.device)
        self.checkpoint = Checkpoint.load(model_path, options.revision)
        self.tokens = checkpoint_tokens(self.checkpoint)
        self.net = network.load(self.checkpoint.directory, self.device, dtype)
        if options.dtype == "int8":  # int8 linears; the rest in the CPU's float dtype where oneDNN's int8 runs
            kernel = quantize_linear(self.net, auto_cpu_dtype(cpu_flags()))
            dtype = next(self.net.parameters()).dtype
            log.info("int8 linears through %s, the rest in %s", kernel, dtype)
        elif self.device == "cpu" and dtype == torch.float32:
            # float32 on CPU (auto without native bfloat16): each linear through a packed oneDNN weight. A
            # decoder step at 16 rows 22.3 -> 17.5 ms, 8 encoder windows 1.77 -> 1.66 s (2 AMD EPYC cores);
            # in bfloat16 the same packing measured within noise, so it is left out (docs/performance.md)
            for part in ("model.encoder", "model.decoder"):
                pack_linears(self.net, part, network.pack_for_onednn)
        self.n_mels = self.net.dims.n_mels
        self.tally = Tally()  # what it did since it loaded (asr.tally), all its decoders together
        self._variants: dict[tuple, tuple[Decoder, WordAligner | None]] = {}
        self.decoder, self.aligner = self._variant()
        log.info("model %s loaded on %s (%s)", model_path, self.device, dtype)

    def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`fn(*args, **kwargs)` on the model thread, waited for (at once when called from it)."""
        return self._thread.run(fn, *args, **kwargs)

    def submit(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> Future[T]:
        """`fn(*args, **kwargs)` on the model thread; its future (asyncio.wrap_future awaits it)."""
        return self._thread.submit(fn, *args, **kwargs)

    def features(self, windows: Sequence[np.ndarray]) -> np.ndarray:
        """Log-mel features of audio windows (each at most 30 s at 16 kHz): (windows, n_mels, 3000)."""
        return self.run(features.log_mel, list(windows), self.n_mels)

    def transcribe(self, feats: np.ndarray, languages: Sequence[Language], durations: Sequence[float],
                   prompts: Sequence[str | None] | None = None, seeds: Sequence[int] | None = None,
                   **changes: Any) -> list[ChunkTranscript]:
        """Chunks' features (chunks, n_mels, 3000), and per chunk its language (None: the options', else
        detected), length in seconds, prompt text (None: --initial-prompt) and sampling seed -> one
        ChunkTranscript each. `changes` alter decoding options for this call (task, temperatures,
        word_timestamps), over the same resident network."""
        return self.run(self._transcribe, feats, list(languages), list(durations), prompts, seeds, changes)

    def _transcribe(self, feats: np.ndarray, languages: list[Language], durations: list[float],
                    prompts: Sequence[str | None] | None, seeds: Sequence[int] | None,
                    changes: dict[str, Any]) -> list[ChunkTranscript]:
        decoder, aligner = self._variant(**changes)
        requested = [lang if isinstance(lang, int) else language_code(lang or self.options.language, self.tokens)
                     for lang in languages]
        prompt_ids = [self.prompt_ids(text or self.options.initial_prompt) for text in (prompts or [None] * len(durations))]
        return transcribe_chunks(decoder, feats, requested, durations, self.text, prompt_ids,
                                 list(seeds) if seeds is not None else None, aligner)

    def detect(self, feats: np.ndarray) -> list[tuple[str, float]]:
        """The language of each window, and its probability (one decoder step after an encoder pass)."""
        return self.run(self.decoder.detect, feats)

    def text(self, ids: Sequence[int]) -> str:
        """Token ids as text, without Whisper's control tokens."""
        return self.checkpoint.text(ids)

    @functools.lru_cache(maxsize=256)  # noqa: B019 - one engine per process, a bounded cache of prompts seen
    def prompt_ids(self, text: str | None) -> list[int] | None:
        """A prompt's tokens, as Whisper encodes it: with a leading space, no special tokens."""
        if not text or not text.strip():
            return None
        return self.checkpoint.tokenizer.encode(" " + text.strip(), add_special_tokens=False).ids

    def _variant(self, **changes: Any) -> tuple[Decoder, WordAligner | None]:
        """The decoder (and word aligner, with word timestamps) for the options with these changes."""
        key = tuple(sorted(changes.items()))
        if key not in self._variants:
            options = dataclasses.replace(self.options, **changes)
            aligner = WordAligner(self.net, self.tokens, self.checkpoint.alignment_heads, options.task, self.text) \
                if options.word_timestamps else None
            self._variants[key] = (Decoder(self.net, self.tokens, options, self.tally), aligner)
        return self._variants[key]
