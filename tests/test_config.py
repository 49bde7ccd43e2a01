"""Tests for ray_whisper.config and the CLI front end: validation on construction, flags generated from
the dataclass fields, round trips through argparse, and fast failure before Ray starts."""

from __future__ import annotations

import dataclasses
import math
import re
import subprocess
import sys
import time

import pytest

from ray_whisper import cli
from ray_whisper.cli import add_arguments, from_namespace
from ray_whisper.config import ConfigError, TranscribeOptions, option_fields

FIELDS = [f.name for f in option_fields()]

# a valid value different from the default for every field (checked below to stay complete)
NON_DEFAULT = {
    "model": "openai/whisper-tiny",
    "revision": "main",
    "language": "de",
    "task": "translate",
    "timestamps": False,
    "word_timestamps": True,
    "language_per_chunk": True,
    "beam_size": 4,
    "dtype": "float16",
    "no_speech_threshold": 0.5,
    "logprob_threshold": -0.5,
    "max_new_tokens": 100,
    "temperatures": "0,0.5",
    "compression_ratio_threshold": 2.0,
    "initial_prompt": "ComfyUI",
    "chunk_length_s": 20.0,
    "stride_length_s": 2.0,
    "search_length_s": 5.0,
    "audio_track": 1,
    "batch_size": 16,
    "min_actors": 2,
    "max_actors": 4,
    "gpus_per_actor": 0.5,
    "cpus_per_actor": 2.0,
    "files_per_task": 8,
    "retry_errors": True,
    "overwrite": True,
    "dashboard": True,
    "allow_partial": True,
    "flush_interval_s": 5.0,
    "s3_endpoint_url": "http://127.0.0.1:9000",
    "s3_region": "eu-west-1",
    "s3_profile": "other",
    "s3_anonymous": True,
    "fetch_timeout_s": 5.0,
}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def argv_for(values: dict) -> list[str]:
    argv = ["transcribe", "manifest.csv", "out"]
    for name, value in values.items():
        if isinstance(value, bool):
            argv.append(flag(name) if value else "--no-" + flag(name)[2:])
        else:
            argv += [flag(name), str(value)]
    return argv


# ---------------------------------------------------------------- construction and validation


def test_defaults_construct():
    opts = TranscribeOptions()
    assert opts.beam_size == 1 and opts.task == "transcribe" and opts.timestamps is True
    assert opts.chunk_length_s == 30.0 and opts.batch_size is None and opts.max_actors is None


def test_non_default_values_construct_and_differ():
    assert set(NON_DEFAULT) == set(FIELDS), "NON_DEFAULT must cover every option"
    opts = TranscribeOptions(**NON_DEFAULT)
    defaults = TranscribeOptions()
    for name, value in NON_DEFAULT.items():
        assert getattr(opts, name) == value
        assert getattr(defaults, name) != value, name


def test_frozen_and_replace_revalidates():
    opts = TranscribeOptions()
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.beam_size = 5  # type: ignore[misc]
    assert opts.replace(beam_size=5).beam_size == 5
    with pytest.raises(ConfigError, match="--beam-size"):
        opts.replace(beam_size=0)


BAD = [
    ({"beam_size": 0}, "--beam-size"),
    ({"beam_size": -3}, "--beam-size"),
    ({"chunk_length_s": 40}, "--chunk-length-s"),
    ({"chunk_length_s": 0}, "--chunk-length-s"),
    ({"chunk_length_s": math.nan}, "--chunk-length-s"),
    ({"stride_length_s": 6.0}, "--stride-length-s"),  # 4 * 6 >= 30 - 8
    ({"stride_length_s": -1.0}, "--stride-length-s"),
    ({"search_length_s": 30.0}, "--search-length-s"),
    ({"search_length_s": 0.0}, "--search-length-s"),
    ({"audio_track": -1}, "--audio-track"),
    ({"min_actors": 3, "max_actors": 2}, "--max-actors"),
    ({"min_actors": 0}, "--min-actors"),
    ({"gpus_per_actor": -1}, "--gpus-per-actor"),
    ({"gpus_per_actor": 9}, "--gpus-per-actor"),
    ({"cpus_per_actor": 0}, "--cpus-per-actor"),
    ({"task": "bogus"}, "--task"),
    ({"dtype": "bogus"}, "--dtype"),
    ({"dtype": "int4"}, "--dtype"),
    ({"dtype": "int8", "gpus_per_actor": 1}, "--dtype int8 runs on CPU only"),
    ({"files_per_task": 0}, "--files-per-task"),
    ({"batch_size": 0}, "--batch-size"),
    ({"max_new_tokens": 0}, "--max-new-tokens"),
    ({"no_speech_threshold": 1.5}, "--no-speech-threshold"),
    ({"logprob_threshold": math.inf}, "--logprob-threshold"),
    ({"language": "en-US!"}, "--language"),
    ({"flush_interval_s": 0}, "--flush-interval-s"),
    ({"flush_interval_s": math.inf}, "--flush-interval-s"),
]


@pytest.mark.parametrize("kwargs,flag_name", BAD, ids=[f"{k}" for k, _ in BAD])
def test_bad_option_names_its_flag(kwargs, flag_name):
    with pytest.raises(ConfigError) as ei:
        TranscribeOptions(**kwargs)
    message = str(ei.value)
    assert flag_name in message
    assert "\n" not in message
    assert isinstance(ei.value, ValueError)


def test_messages_say_what_was_given():
    with pytest.raises(ConfigError, match=r"--max-actors \(2\) must be >= --min-actors \(3\)"):
        TranscribeOptions(min_actors=3, max_actors=2)
    with pytest.raises(ConfigError, match=r"--task must be one of transcribe, translate; got 'bogus'"):
        TranscribeOptions(task="bogus")
    with pytest.raises(ConfigError, match=r"--stride-length-s 6.0 is too long"):
        TranscribeOptions(stride_length_s=6.0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"stride_length_s": 5.4},  # 21.6 < 22
        {"stride_length_s": 0.0},
        {"chunk_length_s": 30.0},
        {"chunk_length_s": 10.0, "search_length_s": 2.0, "stride_length_s": 1.9},
        {"gpus_per_actor": 0.0},
        {"gpus_per_actor": 8.0},
        {"min_actors": 2, "max_actors": 2},
        {"no_speech_threshold": 0.0},
        {"language": "haw"},
    ],
)
def test_boundary_values_are_accepted(kwargs):
    opts = TranscribeOptions(**kwargs)
    for name, value in kwargs.items():
        assert getattr(opts, name) == value


# ---------------------------------------------------------------- argparse


def test_every_field_is_a_flag():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["transcribe"]
    options = {s for a in sub._actions for s in a.option_strings}
    for name in FIELDS:
        assert flag(name) in options, flag(name)
    assert "--no-timestamps" in options


def test_help_contains_every_fields_help(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "10000")  # no wrapping, so help text can be compared verbatim
    with pytest.raises(SystemExit) as ei:
        cli.build_parser().parse_args(["transcribe", "--help"])
    assert ei.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for f in option_fields():
        text = " ".join(f.metadata["help"].split())
        assert text, f"{f.name} has no help"
        assert text in out, f"help of {f.name} missing from --help"
        assert flag(f.name) in out
    assert "(default: 30.0)" in out and "(default: bundled:tiny.en)" in out


def test_parse_round_trip_of_every_field():
    args = cli.build_parser().parse_args(argv_for(NON_DEFAULT))
    assert (args.manifest, args.output) == ("manifest.csv", "out")
    assert from_namespace(args) == TranscribeOptions(**NON_DEFAULT)


def test_parse_round_trip_of_a_few_flags():
    args = cli.build_parser().parse_args(
        ["transcribe", "m.csv", "out", "--batch-size", "16", "--no-timestamps", "--language", "de",
         "--gpus-per-actor", "0.5"]
    )
    opts = from_namespace(args)
    assert opts == TranscribeOptions(batch_size=16, timestamps=False, language="de", gpus_per_actor=0.5)
    assert type(opts.batch_size) is int and type(opts.gpus_per_actor) is float


def test_unset_flags_keep_defaults():
    args = cli.build_parser().parse_args(["transcribe", "m.csv", "out"])
    assert from_namespace(args) == TranscribeOptions()


def test_add_arguments_on_a_plain_parser():
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    opts = from_namespace(parser.parse_args(["--beam-size", "3", "--logprob-threshold", "-0.5", "--timestamps"]))
    assert (opts.beam_size, opts.logprob_threshold, opts.timestamps) == (3, -0.5, True)


@pytest.mark.parametrize(
    "extra,flag_name",
    [(["--beam-size", "x"], "--beam-size"), (["--dtype", "bogus"], "--dtype"), (["--task", "bogus"], "--task")],
)
def test_argparse_rejects_bad_types_and_choices(capsys, extra, flag_name):
    with pytest.raises(SystemExit) as ei:
        cli.build_parser().parse_args(["transcribe", "m.csv", "out", *extra])
    assert ei.value.code == 2
    assert flag_name in capsys.readouterr().err


# ---------------------------------------------------------------- cli.main fails fast, before Ray


@pytest.mark.parametrize(
    "extra,flag_name",
    [
        (["--beam-size", "0"], "--beam-size"),
        (["--chunk-length-s", "40"], "--chunk-length-s"),
        (["--stride-length-s", "9"], "--stride-length-s"),
        (["--min-actors", "3", "--max-actors", "2"], "--max-actors"),
        (["--gpus-per-actor", "-1"], "--gpus-per-actor"),
        (["--files-per-task", "0"], "--files-per-task"),
    ],
)
def test_main_bad_option_returns_2_quickly_without_ray(tmp_path, capsys, monkeypatch, extra, flag_name):
    inits = _count_ray_inits(monkeypatch)
    start = time.perf_counter()
    rc = cli.main(["transcribe", str(tmp_path / "m.csv"), str(tmp_path / "out"), *extra])
    elapsed = time.perf_counter() - start
    assert rc == 2
    assert elapsed < 1.0, f"took {elapsed:.2f} s"
    err = capsys.readouterr().err
    assert err.startswith("ray-whisper: error:") and flag_name in err
    assert inits == []
    assert not (tmp_path / "out").exists()


def _count_ray_inits(monkeypatch) -> list:
    """Records every ray.init the CLI makes (another test module may have left a Ray instance up, so
    ray.is_initialized() cannot tell)."""
    import ray

    calls: list = []
    monkeypatch.setattr(ray, "init", lambda *a, **k: calls.append((a, k)))
    return calls


def test_main_bad_choice_exits_2_via_argparse(tmp_path, capsys, monkeypatch):
    inits = _count_ray_inits(monkeypatch)
    start = time.perf_counter()
    with pytest.raises(SystemExit) as ei:
        cli.main(["transcribe", "m.csv", str(tmp_path / "out"), "--task", "bogus"])
    assert ei.value.code == 2
    assert time.perf_counter() - start < 1.0
    assert "--task" in capsys.readouterr().err
    assert inits == []


def test_cli_process_fails_fast_and_never_imports_ray(tmp_path):
    code = (
        "import sys; from ray_whisper import cli; "
        "rc = cli.main(['transcribe', 'm.csv', sys.argv[1], '--beam-size', '0']); "
        "print('ray' in sys.modules, 'torch' in sys.modules); sys.exit(rc)"
    )
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "out")], capture_output=True, text=True, timeout=60
    )
    elapsed = time.perf_counter() - start
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout.split() == ["False", "False"]  # neither ray nor torch was even imported
    assert "--beam-size must be >= 1" in proc.stderr
    assert elapsed < 10, f"interpreter start + import + fail took {elapsed:.1f} s"


def test_geometry_is_the_chunk_options_in_samples():
    from ray_whisper.asr.chunking import ChunkGeometry

    opts = TranscribeOptions(chunk_length_s=20.0, stride_length_s=1.0, search_length_s=5.0)
    assert ChunkGeometry.of(opts.chunks) == ChunkGeometry.from_seconds(20.0, 1.0, 5.0)
    assert ChunkGeometry.of(opts.chunks) != ChunkGeometry.of(TranscribeOptions().chunks)


def test_each_stage_gets_only_its_group():
    """The model actors are built with DecodingOptions alone; a flat option lands in its group."""
    from ray_whisper.config import DecodingOptions, ResourceOptions

    opts = TranscribeOptions(resources=ResourceOptions(batch_size=4), beam_size=3, overwrite=True)
    assert opts.decoding == DecodingOptions(beam_size=3) and opts.resources.batch_size == 4 and opts.run.overwrite
    assert "overwrite" not in {f.name for f in dataclasses.fields(DecodingOptions)}
    with pytest.raises(ConfigError, match="unknown option.*bogus"):
        TranscribeOptions(bogus=1)


@pytest.mark.parametrize("args, named", [
    ({"max_batch_size": "8", "batch_size": "4"}, "batch_size"),  # a transcribe-only option is refused, not ignored
    ({"bogus-flag": "1"}, "bogus_flag"),
    ({"max_batch_size": "eight"}, "max_batch_size='eight'"),
    ({"max_batch_size": "0"}, "--max-batch-size"),
    ({"word_timestamps": "ture"}, "word_timestamps='ture': expected true or false"),  # not silently off
])
def test_serve_run_arguments_fail_clearly_before_any_replica(args, named):
    from ray_whisper.serve.app import app

    with pytest.raises(ConfigError, match=re.escape(named)):
        app(args)


def test_language_per_window_is_the_same_option_as_language_per_chunk():
    """The issue that asked for it called chunks windows; both names set the one field."""
    for flag, expected in (("--language-per-window", True), ("--language-per-chunk", True), ("--no-language-per-window", False)):
        args = cli.build_parser().parse_args(["transcribe", "m.csv", "out", flag])
        assert from_namespace(args).decoding.language_per_chunk is expected, flag
