"""A long-file corpus that is not cut from one recording, for throughput.py (its `-varied` runs) and
synthetic.py: espeak-ng voices (ten accents and variants, male and female, 130-200 words a minute, pitch
30-70) reading the paragraphs of licence texts (GPL-3, Apache-2.0), interleaved with the shared human
recordings (jfk and its halves, both speakers of stereo_diarization.wav, the English MIT licence), each piece
sped 0.9-1.1x, at its own level (-28 to -16 dBFS RMS, peaks below -1 dBFS), one in seven band-limited to a telephone line's
300-3400 Hz, with pauses of 0-6 s between pieces and background noise at -40 to -25 dBFS on every other file.
Files of 2-8 minutes; the reference of a file is the texts it reads.

Needs espeak-ng (Debian: apt install espeak-ng) and a licence text (Debian's /usr/share/common-licenses).
tiny.en finds espeak-ng's voices hard (WER ~20-30%): compare systems on this corpus with each other, not with
the corpus of throughput.py's recordings.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import wave
from itertools import cycle
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ray_whisper.asr import evaluation as ev  # noqa: E402
from ray_whisper.constants import SAMPLE_RATE  # noqa: E402
from ray_whisper.io.audio import decode_all  # noqa: E402

LICENSES = (Path("/usr/share/common-licenses/GPL-3"), Path("/usr/share/common-licenses/Apache-2.0"))
VOICES = ("en-us", "en", "en-us+m3", "en+f3", "en-gb-scotland+f2", "en-gb-x-rp+m1", "en-029+f4", "en-us-nyc+m7",
          "en-gb-x-gbclan+f1", "en-gb-x-gbcwmd+m4")
RATES_WPM = (130, 200)
PITCHES = (30, 70)
FILE_S = (150, 330, 210, 480, 120, 270, 390, 180, 300, 240)  # cycled and scaled to the minutes asked for
GAPS_S = (0.0, 0.1, 0.3, 0.6, 1.2, 2.5, 6.0)
SPEECH_DBFS = (-28.0, -16.0)  # each piece's RMS level (lower where its peaks would clip)
NOISE_DBFS = (-40.0, -25.0)  # background noise's RMS level, on every other file
HUMAN_SHARE = 0.4  # of the pieces, the human recordings'
TELEPHONE_SHARE = 1 / 7  # of the pieces, band-limited to 300-3400 Hz


def channel(path: Path, index: int | None) -> np.ndarray:
    """A file's samples at 16 kHz: the downmix, or one channel of a 16-bit 16 kHz WAV."""
    if index is None:
        return decode_all(path.read_bytes())
    with wave.open(str(path)) as w:
        assert w.getframerate() == SAMPLE_RATE and w.getsampwidth() == 2, path
        frames = np.frombuffer(w.readframes(w.getnframes()), np.int16).reshape(-1, w.getnchannels())
    return frames[:, index].astype(np.float32) / 32768


def human_clips() -> list[tuple[np.ndarray, str]]:
    """The shared recordings with exact references: jfk whole and cut at its pause, each speaker of
    stereo_diarization.wav, and the English half of multilingual.mp3."""
    data = ROOT / "tests/data"
    refs = json.loads((data / "refs.json").read_text())
    jfk, stereo = channel(data / "jfk.flac", None), data / "stereo_diarization.wav"
    cut = int(7.6 * SAMPLE_RATE)
    return [(jfk, refs["jfk.flac"]["text"]),
            (jfk[:cut], "And so my fellow Americans, ask not what your country can do for you,"),
            (jfk[cut:], "ask what you can do for your country."),
            (channel(stereo, 0)[: 5 * SAMPLE_RATE], refs["stereo_diarization.wav"]["text_left"]),
            (channel(stereo, 1)[: 3 * SAMPLE_RATE], refs["stereo_diarization.wav"]["text_right"]),
            (channel(data / "multilingual.mp3", None)[: int(29.5 * SAMPLE_RATE)], refs["multilingual.mp3"]["text_en"])]


def paragraphs() -> list[str]:
    """The licences' prose paragraphs, one line each (headings, numbered clauses, capitals, addresses left out)."""
    out = []
    for path in LICENSES:
        if not path.exists():
            continue
        for p in (re.sub(r"\s+", " ", p).strip() for p in path.read_text().split("\n\n")):
            if 80 < len(p) < 700 and not p.isupper() and not p[0].isdigit() and "http" not in p and "(C)" not in p:
                out.append(p)
    if not out:
        sys.exit(f"the varied corpus reads a licence text: none of {', '.join(map(str, LICENSES))} is here")
    return out


def speak(text: str, voice: str, wpm: int, pitch: int, wav: Path) -> np.ndarray:
    """`text` read by espeak-ng (lower case: it spells out words in capitals), at 16 kHz."""
    if shutil.which("espeak-ng") is None:
        sys.exit("the varied corpus needs espeak-ng (Debian: apt install espeak-ng)")
    subprocess.run(["espeak-ng", "-v", voice, "-s", str(wpm), "-p", str(pitch), "-w", str(wav), text.lower()],
                   check=True)
    return decode_all(wav.read_bytes())


def _telephone(audio: np.ndarray) -> np.ndarray:
    spectrum = np.fft.rfft(audio)
    hz = np.fft.rfftfreq(audio.size, 1 / SAMPLE_RATE)
    spectrum[(hz < 300) | (hz > 3400)] = 0
    return np.fft.irfft(spectrum, audio.size).astype(np.float32)


def _piece(audio: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A piece sped up or slowed down (0.9-1.1x, by resampling), maybe band-limited, at a random level."""
    clip = np.interp(np.arange(0, audio.size - 1, float(rng.uniform(0.9, 1.1))), np.arange(audio.size), audio)
    if rng.random() < TELEPHONE_SHARE:
        clip = _telephone(clip)
    rms, peak = float(np.sqrt(np.mean(clip**2))) or 1.0, float(np.abs(clip).max()) or 1.0
    return (clip * min(10 ** (float(rng.uniform(*SPEECH_DBFS)) / 20) / rms, 0.9 / peak)).astype(np.float32)


def lengths_s(minutes: float) -> list[float]:
    """Files of 2-8 minutes (FILE_S, cycled) adding up to `minutes`."""
    count = max(1, round(minutes * 60 / np.mean(FILE_S)))
    chosen = [s for s, _ in zip(cycle(FILE_S), range(count))]
    return [s * minutes * 60 / sum(chosen) for s in chosen]


def build(folder: Path, minutes: float, seed: int = 7) -> tuple[list[Path], list[str], float]:
    """WAV files of about `minutes` in all under `folder`, their references, and their total seconds."""
    human, texts = human_clips(), cycle(paragraphs())
    rng = np.random.default_rng(seed)
    paths, refs, total, spoken = [], [], 0.0, 0
    for f, length in enumerate(lengths_s(minutes)):
        parts, words, n = [], [], 0
        while n < length * SAMPLE_RATE:
            if rng.random() < HUMAN_SHARE:
                audio, text = human[int(rng.integers(len(human)))]
            else:
                text = next(texts)
                voice, wpm, pitch = VOICES[spoken % len(VOICES)], rng.integers(*RATES_WPM), rng.integers(*PITCHES)
                audio, spoken = speak(text, voice, int(wpm), int(pitch), folder / "tts.wav"), spoken + 1
            clip = _piece(audio, rng)
            gap = np.zeros(int(float(rng.choice(GAPS_S)) * SAMPLE_RATE), np.float32)
            parts += [clip, gap]
            words.append(text)
            n += clip.size + gap.size
        audio = np.concatenate(parts)
        if f % 2:
            audio += rng.normal(0, 10 ** (float(rng.uniform(*NOISE_DBFS)) / 20), audio.size).astype(np.float32)
        paths.append(ev.write_wav(folder / f"varied_{f:02d}.wav", audio))
        refs.append(" ".join(words))
        total += audio.size / SAMPLE_RATE
    (folder / "tts.wav").unlink(missing_ok=True)
    return paths, refs, total
