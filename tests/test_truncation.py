"""No silent loss: a file that holds less audio than its container declares is transcribed as far as it goes
and says so ("truncated: decoded X s of Y s" on an ok row), whether its header claims more than the file
holds, it was cut mid-sample, or an mp3 lost its second half. Real files, written here from jfk.flac; files
that are whole, or whose length FFmpeg only estimates from their size, are not flagged."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from ray_whisper import schema
from ray_whisper.asr.chunking import ChunkGeometry
from ray_whisper.batch.cpu_stage import chunk_batch
from ray_whisper.constants import SAMPLE_RATE
from ray_whisper.errors import TruncatedError
from ray_whisper.io.audio import decode_all, decode_stream

from audio_helpers import encode
from conftest import DATA


@pytest.fixture(scope="module")
def jfk() -> np.ndarray:
    return decode_all((DATA / "jfk.flac").read_bytes())  # 11.0 s


def header_claims(wav: bytes, factor: int) -> bytes:
    """The WAV with its RIFF and data chunk sizes multiplied by `factor`: a header that claims more than the
    file holds (a recorder that wrote the header first and died)."""
    out = bytearray(wav)
    at = out.find(b"data")
    size = struct.unpack("<I", out[at + 4 : at + 8])[0]
    out[at + 4 : at + 8] = struct.pack("<I", size * factor)
    out[4:8] = struct.pack("<I", len(out) - 8 + size * (factor - 1))
    return bytes(out)


def vbr_mp3_without_length(path: Path, audio: np.ndarray) -> Path:
    """A VBR mp3 with no Xing header, starting with 20 s of silence: FFmpeg estimates its length from the
    first frame's bit rate as ~5x too long, which must not be taken for a declared length."""
    import av

    x = np.concatenate([np.zeros(20 * SAMPLE_RATE, np.float32), audio, audio])
    with av.open(str(path), "w", format="mp3", options={"write_xing": "0"}) as out:
        stream = out.add_stream("libmp3lame", rate=SAMPLE_RATE, layout="mono")
        stream.codec_context.qscale = 2
        stream.codec_context.flags |= av.codec.context.Flags.qscale
        frame = av.AudioFrame.from_ndarray(x[None, :], format="flt", layout="mono")
        frame.sample_rate = SAMPLE_RATE
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            out.mux(packet)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory, jfk) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cut")
    wav = encode(jfk, SAMPLE_RATE, root / "whole.wav").read_bytes()
    mp3 = encode(jfk, SAMPLE_RATE, root / "whole.mp3").read_bytes()
    (root / "claims_110s.wav").write_bytes(header_claims(wav, 10))
    (root / "cut_mid_sample.wav").write_bytes(wav[: len(wav) // 2 + 1])  # odd: half a 16-bit sample at the end
    (root / "half.mp3").write_bytes(mp3[: len(mp3) // 2])
    vbr_mp3_without_length(root / "vbr_no_header.mp3", jfk)
    return {p.stem: p for p in root.iterdir()} | {"jfk": DATA / "jfk.flac"}


def decode_until_cut(path: Path) -> tuple[float, str | None]:
    """Seconds decoded, and the TruncatedError's message (None: the file decoded whole)."""
    got = 0
    try:
        for piece in decode_stream(path.read_bytes()):
            got += piece.size
    except TruncatedError as e:
        return got / SAMPLE_RATE, str(e)
    return got / SAMPLE_RATE, None


@pytest.mark.parametrize("name, decoded, declared", [
    ("claims_110s", 11.0, 110.0), ("cut_mid_sample", 5.5, 11.0), ("half", 5.4, 11.0),
])
def test_a_file_shorter_than_its_container_says_is_decoded_then_named_truncated(files, name, decoded, declared):
    seconds, message = decode_until_cut(files[name])
    assert message == f"decoded {decoded:.1f} s of {declared:.1f} s", message
    assert abs(seconds - decoded) < 0.1  # everything that is there came out first


@pytest.mark.parametrize("name", ["jfk", "whole", "vbr_no_header"])
def test_a_whole_file_is_not_flagged(files, name):
    seconds, message = decode_until_cut(files[name])
    assert message is None and seconds > 10.9


def test_a_truncated_file_is_an_ok_row_that_says_what_it_lost(files):
    """The decode stage's rows: the cut files transcribe what they hold and carry the warning the output row
    shows in `error` (status ok); the whole ones carry none."""
    names = ["claims_110s", "cut_mid_sample", "half", "jfk", "whole", "vbr_no_header"]
    manifest = pa.table({schema.ID: names, schema.AUDIO: [str(files[n]) for n in names],
                         schema.LANGUAGE: [None] * len(names)})
    rows = [r for block in chunk_batch(manifest, ChunkGeometry(), 80) for r in block.to_pylist()]
    warning = {r[schema.ID]: r[schema.WARNING] for r in rows if r[schema.IS_LAST]}
    assert not any(r[schema.ERROR] for r in rows), [r[schema.ERROR] for r in rows if r[schema.ERROR]]
    assert warning["claims_110s"] == "truncated: decoded 11.0 s of 110.0 s"
    assert re.fullmatch(r"truncated: decoded 5\.[45] s of 11\.0 s", warning["cut_mid_sample"])
    assert re.fullmatch(r"truncated: decoded 5\.[45] s of 11\.0 s", warning["half"])
    assert warning["jfk"] is None and warning["whole"] is None and warning["vbr_no_header"] is None
