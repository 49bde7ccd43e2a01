"""Which audio track of a file is transcribed, and the warnings that name the others.

Tracks are numbered among a file's audio streams only, from 0 (ffmpeg's `-map 0:a:N`), whatever video or
subtitle streams come before them. One track is transcribed: `--audio-track N`, else the first the container
flags as default (what a player plays), else track 0. A file with more tracks says which were not transcribed
(an `extra_tracks` warning), and when the transcribed track holds no sound while another does, it says that
too (`silent_track`), so that a silent track 0 is never a quiet "".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import DecodeError

EXTRA_TRACKS = "extra_tracks"  # a warning on an ok row: the file has audio tracks that were not transcribed
SILENT_TRACK = "silent_track"  # a warning on an ok row: the transcribed track is silent, another is not
# A track whose every sample stays below this holds nothing to transcribe: the same -60 dBFS under which the
# chunker decodes no chunk at all (asr.chunking.SILENT_CHUNK_DB), so such a track's text is always "".
SILENT_PEAK_DB = -60.0
SILENT_PEAK = 10 ** (SILENT_PEAK_DB / 20)


def choose(streams: Sequence[Any], track: int | None) -> int:
    """The number of the audio track to transcribe among `streams` (a container's audio streams). A track the
    file does not have is a DecodeError: that file's error row, not the run's failure."""
    if track is None:
        flagged = [k for k, s in enumerate(streams) if _is_default(s)]
        return flagged[0] if flagged else 0
    if not 0 <= track < len(streams):
        raise DecodeError(f"no audio track {track}: the file has {len(streams)} (--audio-track counts from 0)")
    return track


def _is_default(stream: Any) -> bool:
    import av

    return bool(stream.disposition & av.stream.Disposition.default)


def describe(stream: Any) -> str:
    """A track as a person would pick it: its language and title where the container names them."""
    meta = stream.metadata or {}
    named = [v for v in (meta.get("language"), meta.get("title")) if v and v.lower() not in ("und", "")]
    return f" ({', '.join(named)})" if named else ""


def extra_note(streams: Sequence[Any], chosen: int) -> str | None:
    """The warning that names the tracks left out, or None for a file with one audio track. No "; " inside:
    that joins the warnings of one row."""
    if len(streams) < 2:
        return None
    others = ", ".join(f"{k}{describe(s)}" for k, s in enumerate(streams) if k != chosen)
    return (f"{EXTRA_TRACKS}: transcribed audio track {chosen} of {len(streams)} (--audio-track N picks another), "
            f"not {others}")


def silent_note(chosen: int, heard: set[int]) -> str | None:
    """The warning for a transcribed track with no sound while others have some (`heard`: the tracks whose
    samples reached SILENT_PEAK), or None."""
    if chosen in heard or not heard:
        return None
    loud = sorted(heard)
    which = f"track {loud[0]} has" if len(loud) == 1 else f"tracks {', '.join(map(str, loud))} have"
    return (f"{SILENT_TRACK}: audio track {chosen} is silent (nothing above {SILENT_PEAK_DB:g} dBFS) but {which} "
            f"sound: --audio-track {loud[0]} transcribes it")


def loud(samples: np.ndarray) -> bool:
    """Whether decoded samples (float, or integer PCM at full scale) reach SILENT_PEAK."""
    if samples.size == 0:
        return False
    peak = float(np.abs(samples).max())
    if np.issubdtype(samples.dtype, np.integer):
        peak /= float(np.iinfo(samples.dtype).max) + 1
    return peak >= SILENT_PEAK


class Listener:
    """Watches the tracks that are not transcribed, one packet at a time, only for whether they have sound:
    a track is decoded only until a frame of it is loud, and none once the transcribed track is, so a file
    whose transcribed track speaks early costs a few frames of each other track."""

    def __init__(self, numbers: dict[int, int], chosen: int):
        self.numbers = numbers  # stream index -> audio track number
        self.chosen = chosen
        self.heard: set[int] = set()

    def hear(self, samples: np.ndarray) -> None:
        """The transcribed track's decoded samples."""
        if self.chosen not in self.heard and loud(samples):
            self.heard.add(self.chosen)

    def listen(self, packet: Any) -> None:
        """A packet of another track: decoded while its track and the transcribed one are still silent. A
        broken packet there is ignored; the transcribed track alone decides whether the file decodes."""
        import av

        k = self.numbers[packet.stream.index]
        if self.chosen in self.heard or k in self.heard:
            return
        try:
            if any(loud(frame.to_ndarray()) for frame in packet.decode()):
                self.heard.add(k)
        except av.error.FFmpegError:
            return

    @property
    def done(self) -> bool:
        """Nothing left to learn: the transcribed track has sound, or every track has."""
        return self.chosen in self.heard or len(self.heard) == len(self.numbers) - 1

    def notes(self) -> list[str]:
        note = silent_note(self.chosen, self.heard)
        return [note] if note else []
