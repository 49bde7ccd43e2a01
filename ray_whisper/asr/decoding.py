"""The one batched decoder: greedy search or beam search over network.Whisper and its cache, under Whisper's
timestamp rules, with each chunk's no-speech probability, language and mean token log-probability.

Chunks of many files share a batch, each row with its own language. Rows (greedy) or chunks (beam search)
leave the batch and its caches as soon as they end, so a batch costs what its rows need, not its longest
row times its size: on CPU every decoder step reads every row's cross-attention cache (~18 MB per row for
tiny). transformers is not used here; the tests compare this decoder against it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..config import DecodingOptions
from ..constants import MAX_INITIAL_TIMESTAMP_S, SECONDS_PER_TOKEN
from ..model.kv_cache import DecoderCache
from ..model.network import Whisper
from .tally import Tally
from .tokens import SpecialTokens

# How often (decoder steps) a greedy or sampled row's tokens so far are checked for a loop (Decoder.__call__'s
# `loops`): tokenizing a batch's rows costs ~1 ms, a step of tiny.en at batch 16 ~15-30 ms on 2 CPU cores.
LOOP_CHECK_STEPS = 16


@dataclass
class Decoded:
    """One chunk's decoding."""

    tokens: list[int]  # text and timestamp tokens, without the prompt and the end of text
    language: str
    no_speech_prob: float  # at the start-of-transcript position
    avg_logprob: float  # mean log-probability of the chosen tokens (the end of text included)
    temperature: float = 0.0  # 0: the likeliest tokens; above: a sample (a fallback)
    language_prob: float = math.nan  # the probability of `language` where it was detected


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


def choose_sampled(logits: torch.Tensor, temperatures: torch.Tensor, generators: list[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
    """A token per row sampled at its temperature (one per row), each row with its own generator, and its
    log-probability under the model's own (temperature 1) distribution, as Whisper scores a sample.

    By the inverse of the distribution's cumulative sum, one uniform number per row from its generator: torch's
    multinomial draws a random number for every token of the vocabulary (1.2 ms a row on 2 AMD EPYC cores;
    the whole choice of 8 rows 11 ms -> under 1 ms). The first token whose cumulative probability exceeds the
    number: a suppressed token (probability 0) is never chosen."""
    cdf = (logits / temperatures[:, None]).softmax(-1).double().cumsum(-1)
    u = torch.cat([torch.rand(1, generator=g, dtype=torch.float64, device=logits.device) for g in generators])
    token = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0].clamp_(max=logits.shape[1] - 1)
    return token, logits.log_softmax(-1).gather(1, token[:, None])[:, 0]


class Decoder:
    """Decodes batches of log-mel features: `decoder(features, languages) -> [Decoded]`."""

    def __init__(self, net: Whisper, tokens: SpecialTokens, options: DecodingOptions, tally: Tally | None = None):
        self.net = net
        self.tally = tally if tally is not None else Tally()  # an engine's decoders share one
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

    def encode(self, feats: np.ndarray) -> torch.Tensor:
        """The encoder's output for (chunks, n_mels, 3000) features, to decode (and align) without encoding again."""
        self.tally.encoder_windows += len(feats)
        with torch.inference_mode(), self.tally.timing("encoder_s"):
            return self.net.encode(torch.from_numpy(feats).to(self.device, next(self.net.parameters()).dtype))

    def _forward(self, tokens: torch.Tensor, cache: DecoderCache) -> torch.Tensor:
        """One decoder step (a prompt's tokens at once) for every row of the cache, counted."""
        self.tally.decoder_steps += 1
        self.tally.decoder_tokens += tokens.numel()
        with self.tally.timing("decoder_s"):
            return self.net.decode(tokens, cache)

    def __call__(self, feats: np.ndarray, languages: list[str | int | None], prompts: list[list[int]] | None = None,
                 temperature: float | list[float] = 0.0, seeds: list[int] | None = None,
                 encoded: torch.Tensor | None = None, hold_s: list[float | None] | None = None,
                 loops: Callable[[list[int]], bool] | None = None,
                 attempts: tuple[list[int], Callable[[Decoded], bool]] | None = None) -> list[Decoded]:
        """Decode (chunks, n_mels, 3000) features. Per chunk: its language (a code; None: detect it, English for
        English-only models; or the index of another chunk of the batch whose detected language it takes: a
        file's language detected on one of its chunks), the token ids of its prompt (Whisper's <|startofprev|>
        text: names, jargon, earlier text) and, when `temperature` > 0 (sampling instead of the likeliest
        token), the seed that makes its sample repeatable, and the time (seconds; None: none) before which a
        greedy decoding may not end after a timestamp (asr.transcribe: the hold). `loops`, given a greedy or
        sampled row's tokens so far, says whether they already loop: such a row stops there, every
        LOOP_CHECK_STEPS steps, instead of repeating itself up to --max-new-tokens.

        `temperature` may be one per chunk (all above 0): the fallback decodes a chunk at several temperatures
        at once. `attempts` = (chunk of each row, `good`): rows of one chunk are its attempts in order, and once
        one ends and `good` accepts it, the later ones still decoding stop there (their Decoded are left
        unfinished: the caller takes the first good attempt, as Whisper's one temperature after another)."""
        net = self.net
        chunks = len(feats) if encoded is None else encoded.shape[0]
        temperatures = list(temperature) if isinstance(temperature, (list, tuple)) else [temperature] * chunks
        if len(set(temperatures)) > 1 and min(temperatures) <= 0:
            raise ValueError("temperatures per chunk are for sampling: all above 0")
        beams = self.opt.beam_size if temperatures[0] == 0 else 1  # beams at temperature 0, as Whisper
        encoded = self.encode(feats) if encoded is None else encoded
        with torch.inference_mode():
            prefixes = [self._prefix(p) for p in (prompts or [None] * chunks)]
            width = max(len(p) for p in prefixes)
            padded = [[self.t.eot] * (width - len(p)) + p for p in prefixes for _ in range(beams)]
            offsets = torch.tensor([width - len(p) for p in prefixes for _ in range(beams)], device=self.device)
            rest_len = len(self.t.prompt(None, self.opt.task, self.opt.timestamps)) - 1
            cache = net.new_cache(encoded, width + rest_len + self.opt.max_new_tokens, group=beams, offsets=offsets)
            # every row ends at its start-of-transcript, whose logits give the no-speech and language probabilities
            logits = self._forward(torch.tensor(padded, device=self.device), cache)
            no_speech = logits[::beams].softmax(-1)[:, self.t.no_speech].tolist()
            languages, language_probs = self._languages(logits[::beams], languages)
            rest = [self.t.prompt(lang, self.opt.task, self.opt.timestamps)[1:] for lang in languages for _ in range(beams)]
            if rest[0]:
                logits = self._forward(torch.tensor(rest, device=self.device), cache)
            def decoded(i: int, tokens: list[int], sum_logprob: float) -> Decoded:
                return Decoded(tokens, languages[i], float(no_speech[i]), sum_logprob / max(len(tokens), 1),
                               temperatures[i], language_probs[i])

            if beams > 1:
                tokens, sum_logprob = self._beam(logits, cache)
            else:
                good = None if attempts is None else (attempts[0], lambda i, t, lp: attempts[1](decoded(i, t, lp)))
                tokens, sum_logprob = self._greedy(logits, cache, temperatures, seeds or list(range(chunks)), hold_s,
                                                   loops, good)
        return [decoded(i, tokens[i], float(sum_logprob[i])) for i in range(chunks)]

    def _prefix(self, prompt: list[int] | None) -> list[int]:
        """<|startofprev|> and the prompt's last tokens (at most half the decoder's context), then
        <|startoftranscript|>; just the latter without a prompt."""
        if not prompt or self.t.sot_prev is None:
            return [self.t.sot]
        keep = self.net.dims.n_text_ctx // 2 - 1
        return [self.t.sot_prev, *prompt[-keep:], self.t.sot]

    def _languages(self, sot_logits: torch.Tensor, requested: list[str | int | None]) -> tuple[list[str], list[float]]:
        """Each row's language and, where it was detected, its probability at the start of transcript."""
        if not self.t.multilingual:
            return ["en"] * len(requested), [math.nan] * len(requested)
        detected, probs = self._detected(sot_logits)
        own = [(r, math.nan) if isinstance(r, str) else (detected[i], probs[i]) for i, r in enumerate(requested)]
        resolved = [own[r] if isinstance(r, int) and not isinstance(r, bool) else own[i] for i, r in enumerate(requested)]
        return [lang for lang, _ in resolved], [p for _, p in resolved]

    def _detected(self, sot_logits: torch.Tensor) -> tuple[list[str], list[float]]:
        codes = list(self.t.languages)
        ids = torch.tensor([self.t.languages[c] for c in codes], device=sot_logits.device)
        probs = sot_logits[:, ids].float().softmax(-1)  # over the language tokens alone, as Whisper's detection
        best, index = probs.max(-1)
        return [codes[i] for i in index.tolist()], best.tolist()

    def detect(self, feats: np.ndarray) -> list[tuple[str, float]]:
        """The language of each chunk and its probability, from the start-of-transcript step alone."""
        encoded = self.encode(feats)
        with torch.inference_mode():
            cache = self.net.new_cache(encoded, 1)
            sot = torch.full((encoded.shape[0], 1), self.t.sot, dtype=torch.long, device=self.device)
            codes, probs = self._detected(self._forward(sot, cache))
        return list(zip(codes, probs))

    def _steps(self, cache: DecoderCache) -> int:
        # the last token chosen is never fed back, so a full cache still allows one more
        return min(self.opt.max_new_tokens, cache.capacity - cache.length + 1)

    def _mask(self, logits: torch.Tensor, step: int, state: RuleState) -> None:
        logits.index_fill_(1, self.suppress, -math.inf)
        if step == 0:
            logits.index_fill_(1, self.suppress_begin, -math.inf)
        if self.rules is not None:
            self.rules.apply(logits, step, state)

    def _greedy(self, logits: torch.Tensor, cache: DecoderCache, temperatures: list[float],
                seeds: list[int], hold_s: list[float | None] | None = None,
                loops: Callable[[list[int]], bool] | None = None,
                good: tuple[list[int], Callable[[int, list[int], float], bool]] | None = None,
                ) -> tuple[list[list[int]], list[float]]:
        """The likeliest token at every step, or at a row's temperature > 0 a token sampled from the
        distribution sharpened or flattened by it, each row from its own seeded generator (the same random
        numbers whatever else is in the batch). Rows that end, or whose tokens so far `loops` finds looping, leave the
        batch and the caches at once; with `good` (chunk of each row, and whether a row's ended decoding is
        good), so do the later rows of a chunk whose earlier row ended good."""
        generators = temps = None
        if temperatures[0] > 0:
            generators = [torch.Generator(device=self.device).manual_seed(int(s)) for s in seeds]
            temps = torch.tensor(temperatures, device=self.device, dtype=logits.dtype)
        rows = torch.arange(logits.shape[0], device=self.device)  # batch row of each row still decoding
        state = RuleState.start(rows.numel(), self.device)
        sum_logprob = torch.zeros(rows.numel(), device=self.device)
        steps = self._steps(cache)
        generated = torch.full((rows.numel(), steps), self.t.eot, dtype=torch.long, device=self.device)
        hold = None
        if hold_s is not None and self.rules is not None:
            hold = torch.tensor([-1 if h is None else int(h / SECONDS_PER_TOKEN) for h in hold_s], device=self.device)
        for step in range(steps):
            self._mask(logits, step, state)
            if hold is not None:
                self._hold(logits, state, hold[rows])
            if generators is None:
                token, logprob = choose_greedy(logits)
            else:
                token, logprob = choose_sampled(logits, temps[rows], [generators[r] for r in rows.tolist()])
            sum_logprob[rows] += logprob
            generated[rows, step] = token
            state = state.advance(token, self.t.timestamp_begin)
            going = token != self.t.eot
            if loops is not None and (step + 1) % LOOP_CHECK_STEPS == 0:
                done = generated[rows, : step + 1].tolist()
                going &= torch.tensor([not loops(row) for row in done], device=self.device)
            if good is not None and not bool(going.all()):
                going &= self._still_wanted(rows, going, token, generated, sum_logprob, step, good)
            n_going = int(going.sum())
            if n_going == 0:
                break
            if n_going < rows.numel():
                order = cache.drop(going)
                rows, token, state = rows[order], token[order], state.select(order)
            if step + 1 < steps:
                logits = self._forward(token[:, None], cache)
        seqs = generated.tolist()
        return [s[: s.index(self.t.eot)] if self.t.eot in s else s for s in seqs], sum_logprob.tolist()

    def _still_wanted(self, rows: torch.Tensor, going: torch.Tensor, token: torch.Tensor, generated: torch.Tensor,
                      sum_logprob: torch.Tensor, step: int,
                      good: tuple[list[int], Callable[[int, list[int], float], bool]]) -> torch.Tensor:
        """Per row still decoding, False where an earlier row of its chunk has just ended good (see _greedy)."""
        chunk_of, is_good = good
        batch = rows.tolist()
        ended = [r for r, g, t in zip(batch, going.tolist(), token.tolist()) if not g and t == self.t.eot]
        settled = {}  # chunk -> its first row (the lowest temperature) that ended good
        for r in sorted(ended):
            tokens = generated[r, :step].tolist()  # without the end of text, as the caller gets them
            if chunk_of[r] not in settled and is_good(r, tokens, float(sum_logprob[r])):
                settled[chunk_of[r]] = r
        return torch.tensor([not (chunk_of[r] in settled and r > settled[chunk_of[r]]) for r in batch],
                            device=self.device)

    def _hold(self, logits: torch.Tensor, state: RuleState, until: torch.Tensor) -> None:
        """No end of text for a row whose last token is a timestamp (one closing a segment, or the one opening the
        next, where Whisper stops early) before its `until` timestamp, and after the first: it must go on with
        the next segment (asr.transcribe: the hold)."""
        held = state.last_was_ts & (state.last_ts > 0) & (state.last_ts < until)
        index = held.nonzero()[:, 0]
        if index.numel():
            logits[index, self.t.eot] = -math.inf

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
                logits = self._forward(token_t[:, None], cache)
        best = [max(f, key=lambda sf: sf[0] / max(len(sf[1]), 1)) if f else (0.0, []) for f in finished]
        return [b[1] for b in best], [b[0] for b in best]
