"""Every column that moves between stages, and the output table. Each stage names the columns it needs
and checks them with `require`.

    manifest rows   id, audio, language                       (io.manifest -> batch.cpu_stage)
    chunk rows      one per chunk, or one error row per file  (batch.cpu_stage -> batch.model_stage)
    token rows      chunk rows with their decoded segments    (batch.model_stage -> batch.assemble)
    output rows     one per manifest row                      (batch.assemble -> Parquet parts)
    receipts        one per output row written                (batch.assemble -> the driver)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pyarrow as pa

from .errors import ContractError

# manifest
ID = "id"  # optional in the manifest: defaults to a stable hash of `audio`
AUDIO = "audio"  # required: path or URI of the audio file
LANGUAGE = "language"  # optional: spoken language per row
PROMPT = "prompt"  # optional: text every chunk of the row's file is conditioned on (overrides --initial-prompt)
MANIFEST_COLUMNS = (ID, AUDIO, LANGUAGE, PROMPT)

# chunk rows
CHUNK_INDEX = "chunk_index"  # 0, 1, ... within the file
IS_LAST = "is_last"  # the file's last chunk (its index + 1 is the file's chunk count)
START = "start"  # samples at 16 kHz from the start of the file
END = "end"
STRIDE_LEFT = "stride_left"  # samples shared with the previous chunk
STRIDE_RIGHT = "stride_right"
FEATURES = "features"  # float16 log-mel bytes, (n_mels, 3000); empty: silent, not decoded
ERROR = "error"  # "<kind>: <reason>": the file failed (an error row carries no audio)
WARNING = "warning"  # a note that drops no audio ("truncated: ..."); the file's last chunk carries it
# the file's language is detected once, on its first chunk with sound (the detection chunk); every later row
# of the file carries that chunk's features, so whichever model actor decodes it can detect the same language
DETECT_INDEX = "detect_index"  # the detection chunk's index; -1: no detection (language given, or per chunk)
DETECT_FEATURES = "detect_features"  # its features (rows after it); empty on itself and when not needed
# transcribe_dataset only: a file's audio given in memory instead of by its URI, and the input row's other
# columns (pickled), which ride on the file's last chunk row (or its error row) to its output row
AUDIO_BYTES = "audio_bytes"
CARRY = "carry"

CHUNK_SCHEMA = pa.schema(
    [
        (ID, pa.string()),
        (AUDIO, pa.string()),
        (LANGUAGE, pa.string()),
        (PROMPT, pa.string()),
        (CHUNK_INDEX, pa.int32()),
        (IS_LAST, pa.bool_()),
        (START, pa.int64()),
        (END, pa.int64()),
        (STRIDE_LEFT, pa.int64()),
        (STRIDE_RIGHT, pa.int64()),
        (FEATURES, pa.large_binary()),
        (ERROR, pa.string()),
        (WARNING, pa.string()),
        (DETECT_INDEX, pa.int32()),
        (DETECT_FEATURES, pa.large_binary()),
        (CARRY, pa.large_binary()),
    ]
)
# what the model stage reads; everything else of a chunk row passes through it untouched
MODEL_INPUT = (ID, LANGUAGE, PROMPT, CHUNK_INDEX, START, END, FEATURES, ERROR, DETECT_INDEX, DETECT_FEATURES)

# token rows: the chunk rows (features dropped) with the chunk's segments as parallel lists, times in
# seconds from the chunk's start
SEG_START = "seg_start"
SEG_END = "seg_end"
SEG_TOKENS = "seg_tokens"
NO_SPEECH_PROB = "no_speech_prob"
AVG_LOGPROB = "avg_logprob"
LANGUAGE_PROB = "language_prob"  # of the language the chunk was decoded in, when it was detected
SEG_WORDS = "seg_words"  # per segment, its timed words (word, start, end, probability, tokens); [] without
TOKEN_COLUMNS = tuple(n for n in CHUNK_SCHEMA.names if n not in (FEATURES, DETECT_FEATURES)) + (
    SEG_START, SEG_END, SEG_TOKENS, NO_SPEECH_PROB, AVG_LOGPROB, LANGUAGE_PROB, SEG_WORDS,
)
ASSEMBLE_INPUT = (ID, AUDIO, LANGUAGE, CHUNK_INDEX, IS_LAST, START, END, STRIDE_LEFT, STRIDE_RIGHT, ERROR, WARNING,
                  SEG_START, SEG_END, SEG_TOKENS, LANGUAGE_PROB, SEG_WORDS)  # and CARRY where there is one

# output rows: exactly one per manifest row
TEXT = "text"
SEGMENTS = "segments"
DURATION_S = "duration_s"
NUM_CHUNKS = "num_chunks"
MODEL = "model"
FINGERPRINT = "fingerprint"
STATUS = "status"
LANGUAGE_PROBABILITY = "language_probability"
WORDS = "words"
WORD_TYPE = pa.struct([("word", pa.string()), ("start", pa.float64()), ("end", pa.float64()),
                       ("probability", pa.float64())])
SEGMENT_TYPE = pa.struct([("start", pa.float64()), ("end", pa.float64()), ("text", pa.string()),
                          ("language", pa.string())])
OUTPUT_SCHEMA = pa.schema(
    [
        pa.field(ID, pa.string(), nullable=False),
        pa.field(AUDIO, pa.string(), nullable=False),  # as listed (relative paths resolved), secrets redacted
        pa.field(TEXT, pa.string()),  # whole transcript; "" for silence, null on error
        pa.field(SEGMENTS, pa.list_(SEGMENT_TYPE)),  # seconds from the start of the file
        pa.field(WORDS, pa.list_(WORD_TYPE)),  # with --word-timestamps: every word, in the order spoken; else null
        pa.field(LANGUAGE, pa.string()),  # requested, or detected (once per file, or most chunks' vote)
        pa.field(LANGUAGE_PROBABILITY, pa.float64()),  # the detection's probability of it; null when requested
        pa.field(DURATION_S, pa.float64()),  # decoded audio length
        pa.field(NUM_CHUNKS, pa.int32()),  # chunks transcribed
        pa.field(MODEL, pa.string()),
        pa.field(FINGERPRINT, pa.string()),  # of the options that shaped the row (config.fingerprint)
        pa.field(STATUS, pa.string(), nullable=False),  # "ok" or "error"
        pa.field(ERROR, pa.string()),  # "<kind>: <reason>" when status is "error"; a warning otherwise
    ]
)

CARRIED_OUTPUT_SCHEMA = OUTPUT_SCHEMA.append(pa.field(CARRY, pa.large_binary()))  # transcribe_dataset's rows

# receipts: what the driver learns of each row that reached storage (progress, summary, the index)
PART = "part"  # the part file's name in OUTPUT_DIR
WRITE_ERROR = "write_error"  # set when writing the part failed (the rows did not reach storage)
RECEIPT_SCHEMA = pa.schema(
    [(ID, pa.string()), (STATUS, pa.string()), (DURATION_S, pa.float64()), (ERROR, pa.string()), (PART, pa.string()),
     (WRITE_ERROR, pa.string())]
)

STATUS_OK = "ok"
STATUS_ERROR = "error"


def present(value: Any) -> bool:
    """A set string: null strings arrive as None or NaN, depending on the batch format."""
    return isinstance(value, str) and bool(value)


def error_row(file_id: str, audio: str, model_name: str, fingerprint: str, error: str) -> dict[str, Any]:
    """The output row of a file that failed: `error` is "<kind>: <reason>"."""
    return {
        ID: file_id, AUDIO: audio, TEXT: None, SEGMENTS: None, WORDS: None, LANGUAGE: None,
        LANGUAGE_PROBABILITY: None, DURATION_S: None, NUM_CHUNKS: 0, MODEL: model_name, FINGERPRINT: fingerprint,
        STATUS: STATUS_ERROR, ERROR: error,
    }


def require(columns: Iterable[str], needed: Iterable[str], stage: str) -> None:
    """Raise ContractError naming the columns `stage` needs but did not get."""
    have = set(columns)
    missing = [c for c in needed if c not in have]
    if missing:
        raise ContractError(f"the {stage} stage got rows without {', '.join(missing)} (it has: {', '.join(sorted(have))})")
