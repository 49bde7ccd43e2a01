"""The resident-model stage: a callable class for `map_batches` that keeps Whisper loaded and decodes
batches of windows from many files at once.

Decoding is a greedy loop of our own over the plain-PyTorch network (network.py), not transformers'
`generate()`: it needs the no-speech probability at the start-of-transcript position, the mean token
log-probability, per-row languages in one batch, and Whisper's timestamp rules, all in one pass, and it
drops rows from the batch as they end. Beam search (beam_size > 1) goes through `generate()` instead.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import features, schema
from .audio import SAMPLE_RATE, SECONDS_PER_TOKEN
from .config import TranscribeOptions

log = logging.getLogger(__name__)

MAX_INITIAL_TIMESTAMP_S = 1.0  # the first segment starts within 1 s of the window start (as Whisper)


@dataclass(frozen=True)
class SpecialTokens:
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

    @property
    def multilingual(self) -> bool:
        return bool(self.languages)


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
        from .languages import LANGUAGE_CODES

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
    )


def _required(tok: Any, name: str) -> int:
    i = tok(name)
    if i is None:
        raise ValueError(f"tokenizer has no {name} token: this is not a Whisper tokenizer")
    return i


def language_code(language: str | None, tokens: SpecialTokens) -> str | None:
    """Normalise 'English' / 'en' to 'en'; raise ValueError naming the choices for an unknown language."""
    if language is None:
        return None
    from .languages import LANGUAGE_NAMES

    code = LANGUAGE_NAMES.get(language.lower(), language.lower())
    if not tokens.multilingual:
        if code != "en":
            raise ValueError(f"language {language!r} needs a multilingual model; this one is English-only")
        return "en"
    if code not in tokens.languages:
        raise ValueError(f"unknown language {language!r}; use a code such as {', '.join(list(tokens.languages)[:12])}")
    return code


class WhisperDecoder:
    """Greedy batched decoding with timestamp rules, no-speech probability and mean log-probability."""

    def __init__(self, net: Any, tokens: SpecialTokens, options: TranscribeOptions, generator: Any = None):
        """`net` is a network.Whisper; `generator`, needed for beam search only, is transformers'
        WhisperForConditionalGeneration sharing its weights."""
        import torch

        self.net = net
        self.generator = generator
        self.t = tokens
        self.opt = options
        vocab = net.dims.vocab_size
        self.device = next(net.parameters()).device
        ids = [i for i in tokens.suppress if i < vocab] + [tokens.no_timestamps, tokens.sot, tokens.transcribe,
                                                              tokens.translate, tokens.no_speech]
        ids += list(tokens.languages.values())
        if not options.timestamps:
            ids += range(tokens.timestamp_begin, vocab)
        # token ids whose logits are set to -inf (every step; and at the first step only)
        self.suppress = torch.tensor(sorted(set(ids)), dtype=torch.long, device=self.device)
        self.suppress_begin = torch.tensor(sorted({i for i in tokens.suppress_at_begin if i < vocab}), dtype=torch.long,
                                           device=self.device)
        self.max_initial = round(MAX_INITIAL_TIMESTAMP_S / SECONDS_PER_TOKEN)

    def prompt(self, language: str | None) -> list[int]:
        ids = [self.t.sot]
        if self.t.multilingual:
            ids += [self.t.languages[language or "en"], self.t.translate if self.opt.task == "translate" else self.t.transcribe]
        if not self.opt.timestamps:
            ids.append(self.t.no_timestamps)
        return ids

    def detect_languages(self, sot_logits: Any) -> list[str]:
        import torch

        codes = list(self.t.languages)
        ids = torch.tensor([self.t.languages[c] for c in codes], device=sot_logits.device)
        return [codes[i] for i in sot_logits[:, ids].argmax(dim=-1).tolist()]

    def __call__(self, feats: np.ndarray, languages: list[str | None]) -> list[dict[str, Any]]:
        """Decode a batch of (n_mels, 3000) features; returns per row: tokens, language, no_speech_prob, avg_logprob."""
        import torch

        net = self.net
        dtype = next(net.parameters()).dtype
        with torch.inference_mode():
            x = torch.from_numpy(feats).to(self.device, dtype, non_blocking=True)
            enc = net.encode(x)
            bsz = enc.shape[0]
            cache = net.new_cache(enc, len(self.prompt(None)) + self.opt.max_new_tokens)  # at most n_text_ctx
            # Step 0: the start-of-transcript position alone gives no-speech and language probabilities.
            sot = torch.full((bsz, 1), self.t.sot, dtype=torch.long, device=self.device)
            sot_logits = net.decode(sot, cache)
            no_speech = sot_logits.softmax(-1)[:, self.t.no_speech].tolist()
            if self.t.multilingual:
                detected = self.detect_languages(sot_logits)
                languages = [lang or det for lang, det in zip(languages, detected)]
            else:
                languages = ["en"] * bsz
            rest = [self.prompt(lang)[1:] for lang in languages]
            logits = net.decode(torch.tensor(rest, dtype=torch.long, device=self.device), cache) if rest[0] else sot_logits
            if self.opt.beam_size > 1:
                tokens, sum_logprob = self._beam(x, enc, languages)
            else:
                tokens, sum_logprob = self._greedy(logits, cache)
        results = []
        for i in range(bsz):
            n = max(len(tokens[i]), 1)
            results.append(
                {
                    "tokens": tokens[i],
                    "language": languages[i],
                    "no_speech_prob": float(no_speech[i]),
                    "avg_logprob": float(sum_logprob[i]) / n,
                }
            )
        return results

    def _greedy(self, logits: Any, cache: Any) -> tuple[list[list[int]], list[float]]:
        """Greedy decoding of the whole batch. Rows that have ended are dropped from the batch (and from the
        key/value caches) as they finish, so a batch costs what its rows need, not its longest row times its
        size: on CPU a decoder step reads every row's cross-attention cache (~18 MB per row for tiny)."""
        import torch

        t, dev = self.t, self.device
        bsz, vocab = logits.shape
        ts = t.timestamp_begin
        ts_index = torch.arange(vocab - ts, device=dev)  # timestamp k <-> token ts + k
        rows = torch.arange(bsz, device=dev)  # batch row of each row still decoding
        # as if a timestamp preceded the start, so the first sampled timestamp must be followed by text
        last_was_ts = torch.ones(bsz, dtype=torch.bool, device=dev)
        penult_was_ts = torch.ones(bsz, dtype=torch.bool, device=dev)
        last_ts = torch.full((bsz,), -1, dtype=torch.long, device=dev)
        sum_logprob = torch.zeros(bsz, device=dev)
        # the last token sampled is never fed back, so a full cache still allows one more
        steps = min(self.opt.max_new_tokens, cache.capacity - cache.length + 1)
        generated = torch.full((bsz, steps), t.eot, dtype=torch.long, device=dev)
        for step in range(steps):
            logits.index_fill_(1, self.suppress, -math.inf)
            if step == 0:
                logits.index_fill_(1, self.suppress_begin, -math.inf)
            if self.opt.timestamps:
                next_tok, logprob = self._pick_with_timestamps(logits, step, last_was_ts, penult_was_ts, last_ts, ts_index)
            else:
                best, next_tok = logits.max(-1)
                logprob = best - logits.logsumexp(-1)
            sum_logprob[rows] += logprob
            generated[rows, step] = next_tok
            is_ts = next_tok >= ts
            penult_was_ts, last_was_ts = last_was_ts, is_ts
            last_ts = torch.where(is_ts, next_tok - ts, last_ts)
            going = next_tok != t.eot
            n_going = int(going.sum())
            if n_going == 0:
                break
            if n_going < rows.numel():
                order = cache.drop(going)
                rows, next_tok = rows[order], next_tok[order]
                last_was_ts, penult_was_ts, last_ts = last_was_ts[order], penult_was_ts[order], last_ts[order]
            if step + 1 < steps:
                logits = self.net.decode(next_tok[:, None], cache)
        seqs = generated.tolist()
        tokens = [s[: s.index(t.eot)] if t.eot in s else s for s in seqs]
        return tokens, sum_logprob.tolist()

    def _beam(self, x: Any, enc: Any, languages: list[str]) -> tuple[list[list[int]], list[float]]:
        """Beam search through transformers' generate(), one call per language in the batch; the
        log-probability of each chosen sequence is then scored by one teacher-forced decoder pass."""
        import torch

        t = self.t
        tokens: list[list[int]] = [[] for _ in languages]
        sum_logprob = [0.0] * len(languages)
        for lang in sorted(set(languages)):
            rows = [i for i, l in enumerate(languages) if l == lang]
            kwargs: dict[str, Any] = {"language": lang, "task": self.opt.task} if t.multilingual else {}
            seqs = self.generator.generate(
                x[rows], num_beams=self.opt.beam_size, return_timestamps=self.opt.timestamps,
                max_new_tokens=self.opt.max_new_tokens, **kwargs,
            )
            prompt = self.prompt(lang)
            for k, i in enumerate(rows):
                # keep text and timestamps; drop the prompt and other control tokens
                kept = [tok for tok in seqs[k].tolist() if tok < t.eot or tok >= t.timestamp_begin]
                tokens[i] = kept
                ids = torch.tensor([prompt + kept + [t.eot]], device=self.device)
                cache = self.net.new_cache(enc[i : i + 1], ids.shape[1])
                logprobs = self.net.decode(ids[:, :-1], cache, every_position=True).log_softmax(-1)[0]
                targets = ids[0, len(prompt) :]
                sum_logprob[i] = float(logprobs[len(prompt) - 1 :].gather(1, targets[:, None]).sum())
        return tokens, sum_logprob

    def _pick_with_timestamps(self, logits, step, last_was_ts, penult_was_ts, last_ts, ts_index):
        """The greedy choice under Whisper's timestamp rules, and its log-probability, per row: timestamps
        in pairs, never decreasing, the first one within 1 s, and text suppressed whenever the timestamps
        together are likelier than any single text token.

        Changes `logits` in place. The text and timestamp parts of the vocabulary are reduced separately
        and the answer assembled from their maxima and log-sum-exps, so the ~50 K text logits are read
        twice per step rather than once per rule (on CPU full-vocabulary masks per rule, then a softmax,
        cost ~25% of a decoder step for tiny)."""
        import torch

        ts, eot = self.t.timestamp_begin, self.t.eot
        text, stamps = logits[:, :ts], logits[:, ts:]
        if step == 0:  # only a timestamp within the first second may start the window
            stamps[:, self.max_initial + 1 :].fill_(-math.inf)
            best, k = stamps.max(-1)
            return ts + k, best - stamps.logsumexp(-1)
        closing = last_was_ts & ~penult_was_ts  # a segment just ended: next is its twin timestamp or eot
        after_pair = last_was_ts & penult_was_ts  # two timestamps in a row: text must follow
        closing_rows = closing.nonzero()[:, 0]
        if closing_rows.numel():
            text[:, :eot].index_fill_(0, closing_rows, -math.inf)
        stamps.masked_fill_(after_pair[:, None], -math.inf)
        floor = last_ts + (~closing).long()  # a closing timestamp may repeat the last one; an opening one may not
        stamps.masked_fill_((ts_index[None, :] < floor[:, None]) & (last_ts >= 0)[:, None], -math.inf)
        text_best, text_k = text.max(-1)
        stamp_best, stamp_k = stamps.max(-1)
        stamp_mass = stamps.logsumexp(-1)
        forced = stamp_mass > text_best  # (log-probabilities share one normaliser: logits compare the same)
        take_stamp = forced | (stamp_best > text_best)  # a tie goes to text, as argmax over the whole vocabulary
        next_tok = torch.where(take_stamp, ts + stamp_k, text_k)
        # forced rows have all text suppressed, so they normalise over the timestamps alone
        norm = torch.where(forced, stamp_mass, torch.logaddexp(text.logsumexp(-1), stamp_mass))
        return next_tok, torch.where(take_stamp, stamp_best, text_best) - norm


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse instead of returning it to the OS (no mmap for large blocks,
    no trimming). A CPU forward pass allocates and frees tensors of tens to hundreds of MB; with glibc's
    defaults each is a fresh mmap whose pages fault in zeroed: ~1.2 M page faults and ~3.5 s of system
    time per batch of 16 windows with tiny.en on 2 cores (15% of the batch's wall time). The actor's memory
    then stays at its peak, as a GPU's caching allocator does. Returns False where there is no glibc."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))  # int's largest


def run_at_normal_priority() -> bool:
    """Undo the niceness Ray gives its worker processes (15) for every thread of this one. A model actor
    whose threads run at 15 loses its CPU to any nice-0 process that wakes up (raylet, the driver's
    executor loop, Ray's own actors), and one preempted thread stalls the others at their next barrier.
    Lowering niceness needs CAP_SYS_NICE (root in most Ray containers); returns False where it is refused."""
    import os

    try:
        threads = [int(t) for t in os.listdir("/proc/self/task")]  # Linux: niceness is per thread
    except OSError:
        threads = [0]
    done = True
    for tid in threads:
        try:
            if os.getpriority(os.PRIO_PROCESS, tid) > 0:
                os.setpriority(os.PRIO_PROCESS, tid, 0)
        except OSError:
            done = False
    return done


SEEK_SLACK_S = 1.0  # a window whose decoded speech ends this much before its end may have lost words


class Transcriber:
    """map_batches callable: loads Whisper once per actor, then turns chunk rows into token rows."""

    def __init__(self, model_path: str, options: TranscribeOptions, n_mels: int, cpu_threads: int | None = None):
        import torch

        import tokenizers

        from . import network
        from .model import load_whisper, local_model_dir, model_files

        self.options = options
        self.n_mels = n_mels
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if not run_at_normal_priority():
            log.info("model actor runs at Ray's worker niceness (lowering it was refused)")
        if self.device == "cpu":
            torch.set_num_threads(cpu_threads or max(1, math.ceil(options.cpus_per_actor)))
            keep_freed_memory()
        dtype = resolve_dtype(options.dtype, self.device)
        config, generation, tokenizer_json = model_files(model_path, options.revision)
        self.tokenizer = tokenizers.Tokenizer.from_str(tokenizer_json)
        self.tokens = special_tokens(self.tokenizer.token_to_id, generation, int(config["vocab_size"]))
        generator = None
        if options.beam_size > 1:  # generate() needs transformers' model; the network shares its weights
            generator, _ = load_whisper(model_path, options.revision, self.device, dtype)
            self.net = network.from_state_dict(config, generator.state_dict())
        else:
            self.net = network.load(local_model_dir(model_path, options.revision), self.device, dtype)
        self.decoder = WhisperDecoder(self.net, self.tokens, options, generator)
        log.info("model %s loaded on %s (%s)", model_path, self.device, dtype)

    def decode(self, feats: np.ndarray, languages: list[str | None], durations: list[float]) -> list[dict[str, Any]]:
        """Decode windows into segments (start_s, end_s, tokens) relative to each window.

        Whisper often stops at the end of a segment well before the end of its window and drops the
        rest. As in its own sequential decoding, such a window is decoded again from its last timestamp
        (once) when there is sound after it; the second pass's segments are appended.
        """
        opt = self.options
        requested = [language_code(lang or opt.language, self.tokens) for lang in languages]
        results = self.decoder(feats, requested)
        out = []
        for r, duration in zip(results, durations):
            segs = [] if self._is_silence(r) else segments_from_tokens(r["tokens"], self.tokens, duration, opt.timestamps)
            out.append({**r, "segments": segs})
        if not opt.timestamps:
            return out
        seek_rows, seek_feats, seek_from = [], [], []
        for i, (row, duration) in enumerate(zip(out, durations)):
            resume = row["segments"][-1][1] if row["segments"] else 0.0
            if row["segments"] and resume < duration - SEEK_SLACK_S and _has_sound(feats[i], resume, duration):
                seek_rows.append(i)
                seek_feats.append(_shift(feats[i], resume))
                seek_from.append(resume)
        if seek_rows:
            again = self.decoder(np.stack(seek_feats), [out[i]["language"] for i in seek_rows])
            for i, r, resume in zip(seek_rows, again, seek_from):
                if self._is_silence(r):
                    continue
                extra = segments_from_tokens(r["tokens"], self.tokens, durations[i] - resume, True)
                out[i]["segments"] += [(resume + s, resume + e, t) for s, e, t in extra]
        return out

    def _is_silence(self, result: dict[str, Any]) -> bool:
        """Whisper's rule: likely no speech and low confidence -> drop the text (it would be invented)."""
        opt = self.options
        return result["no_speech_prob"] > opt.no_speech_threshold and result["avg_logprob"] < opt.logprob_threshold

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        n = len(batch[schema.ID])
        errors = batch[schema.ERROR]
        # null arrives as None or NaN; windows without features were found silent by the decode stage
        ok = [i for i in range(n) if not isinstance(errors[i], str) and len(batch[schema.FEATURES][i])]
        out_tokens: list[list[list[int]]] = [[] for _ in range(n)]
        seg_start: list[list[float]] = [[] for _ in range(n)]
        seg_end: list[list[float]] = [[] for _ in range(n)]
        langs: list[str | None] = [x if isinstance(x, str) and x else None for x in batch[schema.LANGUAGE]]
        no_speech = [float("nan")] * n
        avg_lp = [float("nan")] * n
        err = list(errors)
        kinds = list(batch[schema.ERROR_KIND])
        if ok:
            feats = features.from_bytes([batch[schema.FEATURES][i] for i in ok], self.n_mels)
            durations = [(int(batch[schema.END][i]) - int(batch[schema.START][i])) / SAMPLE_RATE for i in ok]
            try:
                results = self.decode(feats, [langs[i] for i in ok], durations)
            except Exception as e:  # a batch-level model failure must not lose rows: report it per window
                log.exception("model failed on a batch of %d windows", len(ok))
                for i in ok:
                    err[i], kinds[i] = f"{type(e).__name__}: {e}", "model_error"
                results = []
            for i, r in zip(ok, results):
                langs[i], no_speech[i], avg_lp[i] = r["language"], r["no_speech_prob"], r["avg_logprob"]
                for s, e, toks in r["segments"]:
                    seg_start[i].append(s)
                    seg_end[i].append(e)
                    out_tokens[i].append(toks)
        return {
            schema.ID: batch[schema.ID],
            schema.AUDIO: batch[schema.AUDIO],
            schema.LANGUAGE: np.array(langs, dtype=object),
            schema.CHUNK_INDEX: batch[schema.CHUNK_INDEX],
            schema.IS_LAST: batch[schema.IS_LAST],
            schema.START: batch[schema.START],
            schema.END: batch[schema.END],
            schema.STRIDE_LEFT: batch[schema.STRIDE_LEFT],
            schema.STRIDE_RIGHT: batch[schema.STRIDE_RIGHT],
            schema.SEG_START: seg_start,
            schema.SEG_END: seg_end,
            schema.SEG_TOKENS: out_tokens,
            schema.NO_SPEECH_PROB: np.array(no_speech),
            schema.AVG_LOGPROB: np.array(avg_lp),
            schema.ERROR: np.array(err, dtype=object),
            schema.ERROR_KIND: np.array(kinds, dtype=object),
        }


FRAMES_PER_S = 100  # mel frames per second (10 ms hop)


def _has_sound(feats: np.ndarray, from_s: float, to_s: float) -> bool:
    """Whether the window's mel frames between two times rise well above the window's quietest level."""
    level = feats.mean(axis=0)[: int(to_s * FRAMES_PER_S)]
    tail = level[int(from_s * FRAMES_PER_S) :]
    if tail.size < 10:
        return False
    smooth = np.convolve(tail, np.full(10, 0.1), mode="valid")
    floor, loud = float(level.min()), float(np.percentile(level, 90))
    return float(smooth.max()) > floor + 0.5 * (loud - floor)


def _shift(feats: np.ndarray, from_s: float) -> np.ndarray:
    """The window's features from `from_s` on, padded at the end with the level Whisper gives silence."""
    k = int(round(from_s * FRAMES_PER_S))
    out = np.full_like(feats, feats.max() - 2.0)  # Whisper floors at 8 log10 units below the peak, scaled by 1/4
    out[:, : feats.shape[1] - k] = feats[:, k:]
    return out


def segments_from_tokens(tokens: list[int], special: SpecialTokens, duration: float, timestamps: bool):
    """Split one window's generated tokens into (start_s, end_s, text tokens) relative to the window.

    With timestamps, text between an opening and a closing timestamp is a segment; text after the last
    timestamp (the window ended mid-segment) runs to the end of the window. Without, the window is one segment.
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


def resolve_dtype(name: str, device: str):
    import torch

    if name == "auto":
        return torch.float16 if device == "cuda" else torch.float32
    if device == "cpu" and name == "float16":
        log.warning("float16 is slow or unsupported on CPU; using float32")
        return torch.float32
    return getattr(torch, name)


def vote_language(languages: list[str | None]) -> str | None:
    counts = Counter(lang for lang in languages if lang)
    return counts.most_common(1)[0][0] if counts else None
