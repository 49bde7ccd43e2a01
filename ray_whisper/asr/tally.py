"""What an engine did since it loaded, counted as it goes: the windows its encoder ran on, the decoder's steps,
the chunks that took the temperature fallback or a second pass, and the seconds each took. The batch job sums
the tallies of its model actors into the run's summary (batch.account); benchmarks/throughput.py prints them per
audio hour beside faster-whisper's.

Times are wall seconds on the model thread. On CUDA an encoder call returns before its kernels finish (the
decoder's next step waits for them), so there encoder seconds read low and decoder seconds high.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any


@dataclass
class Tally:
    """Counts and seconds since the engine loaded. The passes are not exclusive: a second pass's encoder and
    decoder work is in encoder_*/decoder_* too, and its fallbacks in fallback_*."""

    chunks: int = 0  # chunks asked for (a chunk's second pass and fallbacks are not new chunks)
    encoder_windows: int = 0  # 30 s windows through the encoder: first and second passes (not fallbacks), detection
    encoder_s: float = 0.0
    decoder_steps: int = 0  # decoder forward calls: one token for every row still decoding (a prompt: one call)
    decoder_tokens: int = 0  # the positions those calls computed, summed over rows
    decoder_s: float = 0.0  # in the forward calls alone (not the masking, choosing and bookkeeping between them)
    fallback_chunks: int = 0  # chunks decoded again at a higher temperature (a first and a second pass count apart)
    fallback_decodings: int = 0  # those decodings started: a chunk tried at two temperatures counts twice
    fallback_s: float = 0.0  # their time (the decoder's, and the encoder's on a second pass)
    second_passes: int = 0  # chunks decoded again from their last timestamp (asr.transcribe: seek)
    second_pass_s: float = 0.0  # those passes' time, fallbacks included

    def add(self, other: Tally | dict[str, Any]) -> Tally:
        """The sum of two tallies (the other may be a tally's as_dict(), as an actor reports it)."""
        values = other if isinstance(other, dict) else dataclasses.asdict(other)
        return Tally(**{f.name: getattr(self, f.name) + values.get(f.name, 0) for f in dataclasses.fields(self)})

    def as_dict(self) -> dict[str, Any]:
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in dataclasses.asdict(self).items()}

    @contextmanager
    def timing(self, seconds_field: str) -> Iterator[None]:
        """Add the seconds the block takes to `seconds_field`."""
        started = time.perf_counter()
        try:
            yield
        finally:
            setattr(self, seconds_field, getattr(self, seconds_field) + time.perf_counter() - started)
