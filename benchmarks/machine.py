"""The machine a benchmark ran on, as its results name it: the CPU's model and the features the project's
choices rest on (AMX, AVX512-BF16, AVX2), and the dtype `--dtype auto` resolves to there."""

from __future__ import annotations

import os
import platform


def cpu() -> dict:
    from ray_whisper.model.runtime import NATIVE_BFLOAT16_FLAGS, auto_cpu_dtype, cpu_flags

    flags = cpu_flags()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        model = ""
    return {"model": model or platform.processor(), "arch": platform.machine(), "cpus": os.cpu_count(),
            "amx": "amx_bf16" in flags, "avx512_bf16": "avx512_bf16" in flags, "avx512f": "avx512f" in flags,
            "avx2": "avx2" in flags, "native_bfloat16": bool(flags & NATIVE_BFLOAT16_FLAGS),
            "auto_dtype": str(auto_cpu_dtype(flags)).removeprefix("torch.")}


def describe(info: dict) -> str:
    """One line: "AMD EPYC, x86_64, 2 CPUs (AVX2, AVX512-BF16, no AMX): --dtype auto is bfloat16"."""
    features = ", ".join([name for name, key in (("AVX2", "avx2"), ("AVX-512", "avx512f"), ("AVX512-BF16", "avx512_bf16"))
                          if info[key]] + ["AMX" if info["amx"] else "no AMX"])
    return f"{info['model']}, {info['arch']}, {info['cpus']} CPUs ({features}): --dtype auto is {info['auto_dtype']}"
