"""Column names and Arrow schemas of the rows that move between stages, and of the output table."""

from __future__ import annotations

import pyarrow as pa

# manifest
AUDIO = "audio"  # required: path or URI of the audio file
ID = "id"  # optional: defaults to a stable hash of `audio`
LANGUAGE = "language"  # optional: spoken language per row

# chunk rows (decode stage -> model actors); one row per window, or one error row per failed file
CHUNK_INDEX = "chunk_index"
IS_LAST = "is_last"
START = "start"  # samples at 16 kHz from file start
END = "end"
STRIDE_LEFT = "stride_left"
STRIDE_RIGHT = "stride_right"
FEATURES = "features"  # float16 log-mel bytes, (n_mels, 3000)
ERROR = "error"
ERROR_KIND = "error_kind"

# model actors -> merge: per window, segments as parallel lists (times in seconds from window start)
SEG_START = "seg_start"
SEG_END = "seg_end"
SEG_TOKENS = "seg_tokens"
NO_SPEECH_PROB = "no_speech_prob"
AVG_LOGPROB = "avg_logprob"

# output table: exactly one row per manifest row
SEGMENT_TYPE = pa.struct([("start", pa.float64()), ("end", pa.float64()), ("text", pa.string())])
OUTPUT_SCHEMA = pa.schema(
    [
        pa.field(ID, pa.string(), nullable=False),
        pa.field(AUDIO, pa.string(), nullable=False),
        pa.field("text", pa.string()),  # whole transcript; "" for silence, null on error
        pa.field("segments", pa.list_(SEGMENT_TYPE)),  # seconds from the start of the file
        pa.field(LANGUAGE, pa.string()),  # requested, or detected (most windows' vote)
        pa.field("duration_s", pa.float64()),  # decoded audio length
        pa.field("num_chunks", pa.int32()),  # windows transcribed
        pa.field("model", pa.string()),
        pa.field("status", pa.string(), nullable=False),  # "ok" or "error"
        pa.field(ERROR, pa.string()),  # "<kind>: <reason>" when status is "error"; a warning otherwise
    ]
)

STATUS_OK = "ok"
STATUS_ERROR = "error"
