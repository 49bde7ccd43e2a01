"""Whisper's audio and token geometry, with units; everything here derives from the first four numbers.

A leaf: imports nothing of the package, so any module may import it.
"""

SAMPLE_RATE = 16_000  # Hz: every file is resampled to this
N_FFT = 400  # samples: the 25 ms STFT window
HOP_LENGTH = 160  # samples: 10 ms between mel frames
CHUNK_LENGTH_S = 30  # seconds: the encoder sees exactly this much audio, padded or cut

N_SAMPLES = CHUNK_LENGTH_S * SAMPLE_RATE  # 480,000 samples per chunk
N_FRAMES = N_SAMPLES // HOP_LENGTH  # 3,000 mel frames per chunk
FRAMES_PER_S = SAMPLE_RATE // HOP_LENGTH  # 100 mel frames per second
N_AUDIO_CTX = N_FRAMES // 2  # 1,500 encoder positions: the second conv has stride 2
SECONDS_PER_TOKEN = CHUNK_LENGTH_S / N_AUDIO_CTX  # 0.02 s: one timestamp step is one encoder position

MAX_INITIAL_TIMESTAMP_S = 1.0  # Whisper's rule: the first segment of a chunk starts within its first second
