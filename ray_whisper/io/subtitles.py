"""A transcript as files people use: SRT and WebVTT subtitles, plain text, JSON. One formatter serves the batch
export (export.py) and the endpoint (serve.py).

Cues follow subtitle conventions: at most 2 lines of at most 42 characters, cut at word boundaries, within one
segment. With word timings a cue starts at its first word and ends at its last; without, a segment's time is
shared among its cues by their length in characters. The file syntax is written by well-kept libraries: `srt`
for SRT, `webvtt-py` for WebVTT (pysubs2 was tried: it drops any text in {braces}, taken for ASS tags, and
writes & and < unescaped into WebVTT).
"""

from __future__ import annotations

import datetime
import html
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import srt
import webvtt

from ..config import EXPORT_FORMATS

MAX_CHARS = 42  # per line
MAX_LINES = 2  # per cue
MIN_CUE_S = 0.05  # a cue is shown at least this long (a zero-length segment still gets a visible cue)
FORMATS = EXPORT_FORMATS


@dataclass(frozen=True)
class Cue:
    start: float  # seconds
    end: float
    lines: tuple[str, ...]


def wrap(words: Sequence[str], width: int = MAX_CHARS) -> list[str]:
    """Words into lines of at most `width` characters (a longer word gets a line of its own)."""
    lines: list[str] = []
    for word in words:
        if lines and len(lines[-1]) + 1 + len(word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines


def _groups(words: Sequence[str]) -> list[list[int]]:
    """Indices of `words` grouped into cues of at most MAX_LINES wrapped lines."""
    groups: list[list[int]] = []
    for i, _ in enumerate(words):
        if groups and len(wrap([words[j] for j in groups[-1]] + [words[i]])) <= MAX_LINES:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def cues(segments: Sequence[dict[str, Any]], words: Sequence[dict[str, Any]] | None = None,
         duration: float | None = None) -> list[Cue]:
    """Cues for a row's segments (start, end, text), split on its words' timings when given (start, end, word),
    none past `duration` seconds."""
    out: list[Cue] = []
    timed = list(words or [])
    for seg in segments:
        start, end = float(seg["start"]), float(seg["end"])
        inside = [w for w in timed if start - 0.01 <= float(w["start"]) <= end + 0.01]
        if inside:
            tokens = [w["word"].strip() for w in inside]
            for group in _groups(tokens):
                first, last = inside[group[0]], inside[group[-1]]
                out.append(Cue(float(first["start"]), float(last["end"]), tuple(wrap([tokens[i] for i in group]))))
            continue
        tokens = str(seg["text"]).split()
        groups = _groups(tokens)
        sizes = [sum(len(tokens[i]) + 1 for i in g) for g in groups]
        t = start
        for group, size in zip(groups, sizes):
            share = (end - start) * size / max(sum(sizes), 1)
            out.append(Cue(t, t + share, tuple(wrap([tokens[i] for i in group]))))
            t += share
    return _monotonic(out, duration)


def _monotonic(cues_: list[Cue], limit: float | None) -> list[Cue]:
    """Cues in time order without overlaps, each shown at least MIN_CUE_S, none past `limit` (the file's end)."""
    out: list[Cue] = []
    for cue in cues_:
        start = max(cue.start, out[-1].end if out else 0.0)
        end = max(cue.end, start + MIN_CUE_S)
        if limit is not None:
            start, end = min(start, limit), min(end, limit)
        out.append(Cue(round(start, 3), round(end, 3), cue.lines))
    return out


def to_srt(cue_list: Sequence[Cue]) -> str:
    items = [srt.Subtitle(i, _delta(c.start), _delta(c.end), "\n".join(c.lines)) for i, c in enumerate(cue_list, 1)]
    return srt.compose(items, reindex=False)


def to_vtt(cue_list: Sequence[Cue]) -> str:
    doc = webvtt.WebVTT()
    for c in cue_list:  # WebVTT text is HTML-like: &, < and > are written as character references
        doc.captions.append(webvtt.Caption(_clock(c.start), _clock(c.end), "\n".join(html.escape(x, quote=False) for x in c.lines)))
    return doc.content


def render(row: dict[str, Any], fmt: str) -> str:
    """One output row (schema.OUTPUT_SCHEMA, `words` when present) as a file of format `fmt` (FORMATS)."""
    if fmt == "txt":
        return (row.get("text") or "") + "\n"
    if fmt == "json":
        return json.dumps({k: v for k, v in row.items() if not k.startswith("_")}, ensure_ascii=False, indent=1) + "\n"
    cue_list = cues(row.get("segments") or [], row.get("words"), row.get("duration_s"))
    if fmt == "srt":
        return to_srt(cue_list)
    if fmt == "vtt":
        return to_vtt(cue_list)
    raise ValueError(f"unknown subtitle format {fmt!r}; choose from {', '.join(FORMATS)}")


def _delta(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(milliseconds=round(seconds * 1000))


def _clock(seconds: float) -> str:
    ms = round(seconds * 1000)
    return f"{ms // 3_600_000:02}:{ms // 60_000 % 60:02}:{ms // 1000 % 60:02}.{ms % 1000:03}"
