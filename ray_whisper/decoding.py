"""The one batched decoder: greedy search or beam search over network.Whisper and its cache, under Whisper's
timestamp rules, with each chunk's no-speech probability, language and mean token log-probability.

Chunks of many files share a batch, each row with its own language. Rows (greedy) or chunks (beam search)
leave the batch and its caches as soon as they end, so a batch costs what its rows need, not its longest
row times its size: on CPU every decoder step reads every row's cross-attention cache (~18 MB per row for
tiny). transformers is not used here; the tests compare this decoder against it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .config import DecodingOptions
from .constants import FRAMES_PER_S, MAX_INITIAL_TIMESTAMP_S, SECONDS_PER_TOKEN
from .network import DecoderCache, Whisper
from .tokens import SpecialTokens, segments_from_tokens


@dataclass
class Decoded:
    """One chunk's decoding."""

    tokens: list[int]  # text and timestamp tokens, without the prompt and the end of text
    language: str
    no_speech_prob: float  # at the start-of-transcript position
    avg_logprob: float  # mean log-probability of the chosen tokens (the end of text included)


@dataclass
class RuleState:
    """Per row, what Whisper's timestamp rules need to know of the tokens chosen so far."""

    last_was_ts: torch.Tensor  # bool
    penult_was_ts: torch.Tensor  # bool
    last_ts: torch.Tensor  # long: index of the last timestamp, -1 before the first

    @classmethod
    def start(cls, rows: int, device: torch.device) -> RuleState:
        # as if a timestamp preceded the start, so the first timestamp chosen must be followed by text
        yes = torch.ones(rows, dtype=torch.bool, device=device)
        return cls(yes, yes.clone(), torch.full((rows,), -1, dtype=torch.long, device=device))

    def select(self, rows: torch.Tensor) -> RuleState:
        return RuleState(self.last_was_ts[rows], self.penult_was_ts[rows], self.last_ts[rows])

    def advance(self, chosen: torch.Tensor, timestamp_begin: int) -> RuleState:
        is_ts = chosen >= timestamp_begin
        return RuleState(is_ts, self.last_was_ts, torch.where(is_ts, chosen - timestamp_begin, self.last_ts))


class TimestampRules:
    """Whisper's rules for timestamp tokens, applied to a batch of logits in place: timestamps come in pairs
    (except before the end of text), never decrease, the first one is within the first second, and text is
    suppressed whenever the timestamps together are likelier than any single text token.

    The text and timestamp parts of the vocabulary are masked separately, rows at a time, instead of with
    full-vocabulary masks per rule (on CPU those cost ~25% of a decoder step for tiny)."""

    def __init__(self, tokens: SpecialTokens, vocab_size: int, device: torch.device):
        self.ts = tokens.timestamp_begin
        self.eot = tokens.eot
        self.max_initial = round(MAX_INITIAL_TIMESTAMP_S / SECONDS_PER_TOKEN)
        self.ts_index = torch.arange(vocab_size - self.ts, device=device)  # timestamp k <-> token ts + k

    def apply(self, logits: torch.Tensor, step: int, state: RuleState) -> None:
        text, stamps = logits[:, : self.ts], logits[:, self.ts :]
        if step == 0:  # a chunk starts with a timestamp within its first second
            text.fill_(-math.inf)
            stamps[:, self.max_initial + 1 :].fill_(-math.inf)
            return
        closing = state.last_was_ts & ~state.penult_was_ts  # a segment just ended: its twin timestamp, or eot
        _fill_rows(text[:, : self.eot], closing)
        stamps.masked_fill_((state.last_was_ts & state.penult_was_ts)[:, None], -math.inf)  # text must follow
        floor = state.last_ts + (~closing).long()  # a closing timestamp may repeat the last one; an opening may not
        stamps.masked_fill_((self.ts_index[None, :] < floor[:, None]) & (state.last_ts >= 0)[:, None], -math.inf)
        # log-probabilities share one normaliser, so logits compare the same
        _fill_rows(text, stamps.logsumexp(-1) > text.max(-1).values)


def _fill_rows(part: torch.Tensor, rows: torch.Tensor) -> None:
    """Set the rows of `part` where `rows` (bool) is True to -inf."""
    index = rows.nonzero()[:, 0]
    if index.numel():
        part.index_fill_(0, index, -math.inf)


def choose_greedy(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The likeliest token of each row and its log-probability (a tie goes to the lower id, as argmax)."""
    best, token = logits.max(-1)
    return token, best - logits.logsumexp(-1)


class Decoder:
    """Decodes batches of log-mel features: `decoder(features, languages) -> [Decoded]`."""

    def __init__(self, net: Whisper, tokens: SpecialTokens, options: DecodingOptions):
        self.net = net
        self.t = tokens
        self.opt = options
        self.device = next(net.parameters()).device
        vocab = net.dims.vocab_size
        ids = [i for i in tokens.suppress if i < vocab]
        ids += [tokens.no_timestamps, tokens.sot, tokens.transcribe, tokens.translate, tokens.no_speech]
        ids += list(tokens.languages.values()) + ([tokens.sot_prev] if tokens.sot_prev is not None else [])
        if not options.timestamps:
            ids += range(tokens.timestamp_begin, vocab)
        # token ids whose logits are set to -inf at every step, and at the first step only
        self.suppress = torch.tensor(sorted(set(ids)), dtype=torch.long, device=self.device)
        self.suppress_begin = torch.tensor(sorted({i for i in tokens.suppress_at_begin if i < vocab}),
                                           dtype=torch.long, device=self.device)
        self.rules = TimestampRules(tokens, vocab, self.device) if options.timestamps else None

    def __call__(self, feats: np.ndarray, languages: list[str | None]) -> list[Decoded]:
        """Decode (chunks, n_mels, 3000) features; `languages` per chunk (None: detect, or English)."""
        net, beams = self.net, self.opt.beam_size
        dtype = next(net.parameters()).dtype
        with torch.inference_mode():
            x = torch.from_numpy(feats).to(self.device, dtype, non_blocking=True)
            chunks = x.shape[0]
            prompt_len = len(self.t.prompt(None, self.opt.task, self.opt.timestamps))
            cache = net.new_cache(net.encode(x), prompt_len + self.opt.max_new_tokens, group=beams)
            # The start-of-transcript position alone gives the no-speech and language probabilities.
            sot = torch.full((chunks * beams, 1), self.t.sot, dtype=torch.long, device=self.device)
            logits = net.decode(sot, cache)
            no_speech = logits[::beams].softmax(-1)[:, self.t.no_speech].tolist()
            languages = self._languages(logits[::beams], languages)
            rest = [self.t.prompt(lang, self.opt.task, self.opt.timestamps)[1:] for lang in languages for _ in range(beams)]
            if rest[0]:
                logits = net.decode(torch.tensor(rest, device=self.device), cache)
            search = self._beam if beams > 1 else self._greedy
            tokens, sum_logprob = search(logits, cache)
        return [
            Decoded(tokens[i], languages[i], float(no_speech[i]), float(sum_logprob[i]) / max(len(tokens[i]), 1))
            for i in range(chunks)
        ]

    def _languages(self, sot_logits: torch.Tensor, requested: list[str | None]) -> list[str]:
        if not self.t.multilingual:
            return ["en"] * len(requested)
        codes = list(self.t.languages)
        ids = torch.tensor([self.t.languages[c] for c in codes], device=sot_logits.device)
        detected = [codes[i] for i in sot_logits[:, ids].argmax(dim=-1).tolist()]
        return [lang or det for lang, det in zip(requested, detected)]

    def _steps(self, cache: DecoderCache) -> int:
        # the last token chosen is never fed back, so a full cache still allows one more
        return min(self.opt.max_new_tokens, cache.capacity - cache.length + 1)

    def _mask(self, logits: torch.Tensor, step: int, state: RuleState) -> None:
        logits.index_fill_(1, self.suppress, -math.inf)
        if step == 0:
            logits.index_fill_(1, self.suppress_begin, -math.inf)
        if self.rules is not None:
            self.rules.apply(logits, step, state)

    def _greedy(self, logits: torch.Tensor, cache: DecoderCache) -> tuple[list[list[int]], list[float]]:
        """The likeliest token at every step. Rows that end leave the batch and the caches at once."""
        rows = torch.arange(logits.shape[0], device=self.device)  # batch row of each row still decoding
        state = RuleState.start(rows.numel(), self.device)
        sum_logprob = torch.zeros(rows.numel(), device=self.device)
        steps = self._steps(cache)
        generated = torch.full((rows.numel(), steps), self.t.eot, dtype=torch.long, device=self.device)
        for step in range(steps):
            self._mask(logits, step, state)
            token, logprob = choose_greedy(logits)
            sum_logprob[rows] += logprob
            generated[rows, step] = token
            state = state.advance(token, self.t.timestamp_begin)
            going = token != self.t.eot
            n_going = int(going.sum())
            if n_going == 0:
                break
            if n_going < rows.numel():
                order = cache.drop(going)
                rows, token, state = rows[order], token[order], state.select(order)
            if step + 1 < steps:
                logits = self.net.decode(token[:, None], cache)
        seqs = generated.tolist()
        return [s[: s.index(self.t.eot)] if self.t.eot in s else s for s in seqs], sum_logprob.tolist()

    def _beam(self, logits: torch.Tensor, cache: DecoderCache) -> tuple[list[list[int]], list[float]]:
        """Beam search, `beam_size` beams per chunk, over the same network and cache: each step every chunk
        keeps its `beam_size` likeliest continuations; a continuation that ends is set aside, and a chunk ends
        once it has `beam_size` of them. The answer is the one with the best log-probability per token.
        A chunk's beams share its cross-attention rows (network.Attention.attend's `group`)."""
        k, eot = self.opt.beam_size, self.t.eot
        vocab = logits.shape[1]
        chunk_of = list(range(logits.shape[0] // k))  # chunk (of the batch) of each group of k rows
        seqs: list[list[int]] = [[] for _ in range(logits.shape[0])]
        finished: list[list[tuple[float, list[int]]]] = [[] for _ in chunk_of]
        sums = torch.zeros(logits.shape[0], device=self.device)
        sums.view(-1, k)[:, 1:] = -math.inf  # the k copies of the prompt are one beam until the first step
        state = RuleState.start(logits.shape[0], self.device)
        steps = self._steps(cache)
        for step in range(steps):
            self._mask(logits, step, state)
            scores = (sums[:, None] + logits.log_softmax(-1)).view(len(chunk_of), k * vocab)
            top, flat = (t.tolist() for t in scores.topk(2 * k, dim=-1))  # at most k of 2k end: k go on
            rows, tokens, new_sums, kept = [], [], [], []
            for g, c in enumerate(chunk_of):
                going = []
                for score, index in zip(top[g], flat[g]):
                    beam, token = divmod(index, vocab)
                    if token == eot or step == steps - 1:
                        if len(finished[c]) < k and score > -math.inf:
                            finished[c].append((score, seqs[g * k + beam] + ([] if token == eot else [token])))
                    elif len(going) < k:
                        going.append((g * k + beam, token, score))
                if len(finished[c]) < k and going:
                    kept.append(g)
                    going += [going[-1][:2] + (-math.inf,)] * (k - len(going))  # dead beams fill the group
                    for row, token, score in going:
                        rows.append(row)
                        tokens.append(token)
                        new_sums.append(score)
            if not kept:
                break
            seqs = [seqs[r] + [t] for r, t in zip(rows, tokens)]
            row_t = torch.tensor(rows, device=self.device)
            token_t = torch.tensor(tokens, device=self.device)
            state = state.select(row_t).advance(token_t, self.t.timestamp_begin)
            sums = torch.tensor(new_sums, device=self.device)
            cache.reorder(row_t, torch.tensor(kept, device=self.device) if len(kept) < len(chunk_of) else None)
            chunk_of = [chunk_of[g] for g in kept]
            if step + 1 < steps:
                logits = self.net.decode(token_t[:, None], cache)
        best = [max(f, key=lambda sf: sf[0] / max(len(sf[1]), 1)) if f else (0.0, []) for f in finished]
        return [b[1] for b in best], [b[0] for b in best]


SEEK_SLACK_S = 1.0  # a chunk whose decoded speech ends this much before its end may have lost words


@dataclass
class ChunkTranscript:
    """One chunk's segments, (start_s, end_s, text tokens) relative to the chunk, and how it decoded."""

    segments: list[tuple[float, float, list[int]]]
    language: str
    no_speech_prob: float
    avg_logprob: float


def transcribe_chunks(decoder: Decoder, feats: np.ndarray, languages: list[str | None],
                      durations: list[float]) -> list[ChunkTranscript]:
    """Decode chunks into timed segments, with Whisper's two rules on top of the decoder:

    - silence: a likely no-speech chunk decoded with low confidence has no text (it would be invented);
    - seek: Whisper often stops at the end of a segment well before the end of its chunk and drops the rest.
      As in its own sequential decoding, such a chunk is decoded again from its last timestamp (once) when
      there is sound after it; the second pass's segments are appended.
    """
    opt = decoder.opt
    out = [_transcript(decoder, d, duration) for d, duration in zip(decoder(feats, languages), durations)]
    if not opt.timestamps:
        return out
    again = [
        (i, row.segments[-1][1]) for i, (row, duration) in enumerate(zip(out, durations))
        if row.segments and row.segments[-1][1] < duration - SEEK_SLACK_S
        and _has_sound(feats[i], row.segments[-1][1], duration)
    ]
    if again:
        shifted = np.stack([_shift(feats[i], resume) for i, resume in again])
        for (i, resume), d in zip(again, decoder(shifted, [out[i].language for i, _ in again])):
            extra = _transcript(decoder, d, durations[i] - resume).segments
            out[i].segments += [(resume + s, resume + e, t) for s, e, t in extra]
    return out


def _transcript(decoder: Decoder, d: Decoded, duration: float) -> ChunkTranscript:
    opt = decoder.opt
    silent = d.no_speech_prob > opt.no_speech_threshold and d.avg_logprob < opt.logprob_threshold
    segments = [] if silent else segments_from_tokens(d.tokens, decoder.t, duration, opt.timestamps)
    return ChunkTranscript(segments, d.language, d.no_speech_prob, d.avg_logprob)


def _has_sound(feats: np.ndarray, from_s: float, to_s: float) -> bool:
    """Whether the chunk's mel frames between two times rise well above the chunk's quietest level."""
    level = feats.mean(axis=0)[: int(to_s * FRAMES_PER_S)]
    tail = level[int(from_s * FRAMES_PER_S) :]
    if tail.size < 10:
        return False
    smooth = np.convolve(tail, np.full(10, 0.1), mode="valid")
    floor, loud = float(level.min()), float(np.percentile(level, 90))
    return float(smooth.max()) > floor + 0.5 * (loud - floor)


def _shift(feats: np.ndarray, from_s: float) -> np.ndarray:
    """The chunk's features from `from_s` on, padded at the end with the level Whisper gives silence."""
    k = int(round(from_s * FRAMES_PER_S))
    out = np.full_like(feats, feats.max() - 2.0)  # Whisper floors at 8 log10 units below the peak, scaled by 1/4
    out[:, : feats.shape[1] - k] = feats[:, k:]
    return out
