"""The model stage: a callable class for `map_batches` that keeps one asr.Engine resident per actor, a thin
adapter from chunk rows (schema.CHUNK_SCHEMA) to the engine and from its results to token rows
(schema.TOKEN_COLUMNS). Chunks of many files share a batch.

As in Ray's batch-inference examples, the model loads once in `__init__`. The engine is imported there, in
the actor, so that the driver never imports torch (1.2-2 s before every run's dataset could start). It can
be tried without a cluster: `ModelStage(model_path, DecodingOptions())(ds.take_batch(16))`.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from typing import Any

import numpy as np

from .. import schema
from ..asr import features
from ..asr.chunking import chunk_seed
from ..asr.merge import NOTHING, ChunkTranscript
from ..config import DecodingOptions
from ..constants import SAMPLE_RATE
from ..errors import MODEL_ERROR, row_error
from ..schema import present
from .account import ActorClock, report

log = logging.getLogger(__name__)

FILE_LANGUAGES = 4096  # files whose detected language a model actor remembers


class ModelStage:
    """map_batches callable: one engine per actor; chunk rows in, token rows out."""

    def __init__(self, model_path: str, options: DecodingOptions, cpu_threads: int | None = None,
                 account_key: str | None = None):
        """`account_key`: where to report this actor's time (batch.account); None: nowhere."""
        started = time.time()
        from ..asr.engine import Engine

        self.engine = Engine(model_path, options, cpu_threads)
        self.file_languages: OrderedDict[str, tuple[str, float]] = OrderedDict()  # file id -> (language, prob)
        self.account_key = account_key
        self.clock = ActorClock(started, time.time(), threads=cpu_threads)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        started = time.time()
        out = self.engine.run(self._map, batch)
        self.clock.batch(started, time.time())
        if self.account_key is not None:
            report(self.account_key, self.clock, self.engine.tally)
        return out

    def _map(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        schema.require(batch, schema.MODEL_INPUT, "model")
        n = len(batch[schema.ID])
        errors = list(batch[schema.ERROR])
        # nulls arrive as None or NaN; chunks without features were found silent by the CPU stage
        todo = [i for i in range(n) if not present(errors[i]) and len(batch[schema.FEATURES][i])]
        results: dict[int, ChunkTranscript] = {}
        if todo:
            feats = features.from_bytes([batch[schema.FEATURES][i] for i in todo], self.engine.n_mels)
            durations = [(int(batch[schema.END][i]) - int(batch[schema.START][i])) / SAMPLE_RATE for i in todo]
            prompts = [p if present(p) else None for p in (batch[schema.PROMPT][i] for i in todo)]
            seeds = [chunk_seed(str(batch[schema.ID][i]), int(batch[schema.CHUNK_INDEX][i])) for i in todo]
            try:
                languages, known = self._file_languages(batch, todo)
                decoded = self.engine.transcribe(feats, languages, durations, prompts, seeds)
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
            out.append(lang if present(lang) else None)
            if present(lang) or detect_at < 0:
                continue
            if index == detect_at:
                in_batch[file_id] = k
            elif file_id not in self.file_languages:
                probe[file_id] = batch[schema.DETECT_FEATURES][i]
        probe = {f: blob for f, blob in probe.items() if f not in in_batch}
        if probe:  # files whose detection chunk went to another actor or an earlier batch this actor never saw
            found = self.engine.detect(features.from_bytes(list(probe.values()), self.engine.n_mels))
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


def token_rows(batch: dict[str, Any], results: dict[int, ChunkTranscript], errors: list[Any]) -> dict[str, Any]:
    """Token rows (schema.TOKEN_COLUMNS): the batch's chunk rows with the segments decoded for them."""
    n = len(batch[schema.ID])
    rows = [results.get(i, NOTHING) for i in range(n)]
    passed = {name: batch[name] for name in schema.TOKEN_COLUMNS if name in batch}
    language = [r.language or (x if present(x) else None) for r, x in zip(rows, batch[schema.LANGUAGE])]
    return passed | {
        schema.LANGUAGE: np.array(language, dtype=object),
        schema.ERROR: np.array([e if present(e) else None for e in errors], dtype=object),
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
