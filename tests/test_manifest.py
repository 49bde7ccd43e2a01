"""Tests for ray_whisper.io.manifest: CSV / JSONL / Parquet manifests into (id, audio, language) strings,
default ids, relative paths, and ManifestErrors that name the file and say what is wrong."""

from __future__ import annotations

import gzip
import hashlib
import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ray_whisper.io.manifest import ManifestError, manifest_format, read_manifest, stable_id

ROWS = [
    {"audio": "/data/a.wav", "id": "007", "language": "en"},
    {"audio": "/data/b.mp3", "id": "42", "language": ""},
    {"audio": "s3://bucket/c.flac", "id": "x-1", "language": "de"},
]


def write_csv(path, rows: list[dict], columns: list[str] | None = None):
    columns = columns or list(rows[0])
    lines = [",".join(columns)] + [",".join(str(r.get(c, "")) for c in columns) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_jsonl(path, rows: list[dict]):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_parquet(path, rows: list[dict]):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


WRITERS = {"csv": write_csv, "jsonl": write_jsonl, "parquet": write_parquet}


@pytest.fixture(params=sorted(WRITERS))
def fmt(request) -> str:
    return request.param


def make(tmp_path, fmt: str, rows: list[dict], name: str = "manifest"):
    return str(WRITERS[fmt](tmp_path / f"{name}.{fmt}", rows))


# ---------------------------------------------------------------- reading


def test_reads_each_format(tmp_path, fmt):
    table = read_manifest(make(tmp_path, fmt, ROWS))
    assert table.column_names == ["id", "audio", "language", "prompt"]
    assert all(table.schema.field(c).type == pa.string() for c in table.column_names)
    assert table.to_pylist() == [
        {"id": "007", "audio": "/data/a.wav", "language": "en", "prompt": None},
        {"id": "42", "audio": "/data/b.mp3", "language": None, "prompt": None},  # blank language -> unset
        {"id": "x-1", "audio": "s3://bucket/c.flac", "language": "de", "prompt": None},
    ]


def test_only_audio_column(tmp_path, fmt):
    rows = [{"audio": r["audio"]} for r in ROWS]
    table = read_manifest(make(tmp_path, fmt, rows))
    assert table.column_names == ["id", "audio", "language", "prompt"]
    assert table["language"].null_count == 3
    assert table["audio"].to_pylist() == [r["audio"] for r in ROWS]


def test_default_ids_are_stable_hashes(tmp_path, fmt):
    rows = [{"audio": r["audio"]} for r in ROWS]
    path = make(tmp_path, fmt, rows)
    first = read_manifest(path)["id"].to_pylist()
    second = read_manifest(path)["id"].to_pylist()
    assert first == second
    assert len(set(first)) == 3
    for audio, id_ in zip((r["audio"] for r in ROWS), first):
        assert re.fullmatch(r"[0-9a-f]{16}", id_)
        assert id_ == stable_id(audio) == hashlib.sha1(audio.encode()).hexdigest()[:16]


def test_default_ids_do_not_depend_on_format(tmp_path):
    rows = [{"audio": r["audio"]} for r in ROWS]
    ids = {f: read_manifest(make(tmp_path, f, rows))["id"].to_pylist() for f in WRITERS}
    assert ids["csv"] == ids["jsonl"] == ids["parquet"]


def test_missing_ids_are_filled_per_row(tmp_path):
    path = write_csv(tmp_path / "m.csv", [{"audio": "/a.wav", "id": "1"}, {"audio": "/b.wav", "id": ""}])
    assert read_manifest(str(path))["id"].to_pylist() == ["1", stable_id("/b.wav")]


def test_csv_keeps_ids_and_values_as_text(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("audio,id,language\n/a.wav,007,en\n/b.wav,1e3,\n/c.wav,0.50,\n/d.wav,true,\n")
    table = read_manifest(str(path))
    assert table["id"].to_pylist() == ["007", "1e3", "0.50", "true"]
    assert table.schema.field("id").type == pa.string()


def test_csv_quoting_bom_and_crlf(tmp_path):
    path = tmp_path / "m.csv"
    path.write_bytes('\ufeffaudio,id\r\n"/x/a, b.wav",007\r\n'.encode("utf-8"))
    assert read_manifest(str(path)).to_pylist() == [{"id": "007", "audio": "/x/a, b.wav", "language": None, "prompt": None}]


def test_jsonl_numeric_ids_become_strings(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"audio": "/a.wav", "id": 7}, {"audio": "/b.wav", "id": 8}])
    assert read_manifest(str(path))["id"].to_pylist() == ["7", "8"]


def test_parquet_string_ids_kept(tmp_path):
    path = write_parquet(tmp_path / "m.parquet", [{"audio": "/a.wav", "id": "007"}])
    assert read_manifest(str(path))["id"].to_pylist() == ["007"]


def test_gzipped_csv_and_other_extensions(tmp_path):
    gz = tmp_path / "m.csv.gz"
    gz.write_bytes(gzip.compress(b"audio,id\n/a.wav,007\n"))
    assert read_manifest(str(gz)).to_pylist() == [{"id": "007", "audio": "/a.wav", "language": None, "prompt": None}]
    nd = write_jsonl(tmp_path / "m.ndjson", [{"audio": "/a.wav"}])
    assert read_manifest(str(nd))["audio"].to_pylist() == ["/a.wav"]
    assert manifest_format("s3://b/x.PARQUET") == "parquet"
    assert manifest_format("x.pq") == "parquet"


def test_audio_whitespace_is_trimmed(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text('audio\n"  /a.wav  "\n')
    assert read_manifest(str(path))["audio"].to_pylist() == ["/a.wav"]


# ---------------------------------------------------------------- relative paths


def test_relative_audio_resolves_against_manifest_folder(tmp_path, fmt):
    folder = tmp_path / "project" / "lists"
    folder.mkdir(parents=True)
    rows = [
        {"audio": "a.wav"},
        {"audio": "sub/b.mp3"},
        {"audio": "../clips/c.flac"},
        {"audio": "/abs/d.wav"},
        {"audio": "gs://bucket/e.wav"},
    ]
    table = read_manifest(make(folder, fmt, rows))
    assert table["audio"].to_pylist() == [
        str(folder / "a.wav"),
        str(folder / "sub" / "b.mp3"),
        str(tmp_path / "project" / "clips" / "c.flac"),
        "/abs/d.wav",
        "gs://bucket/e.wav",
    ]
    # default ids hash the resolved location, so they name the file, not the spelling
    assert table["id"].to_pylist()[0] == stable_id(str(folder / "a.wav"))


def test_relative_manifest_path_resolves_from_cwd(tmp_path, monkeypatch):
    (tmp_path / "lists").mkdir()
    write_csv(tmp_path / "lists" / "m.csv", [{"audio": "a.wav"}])
    monkeypatch.chdir(tmp_path)
    assert read_manifest("lists/m.csv")["audio"].to_pylist() == [str(tmp_path / "lists" / "a.wav")]


def test_relative_audio_under_a_remote_manifest_uri(tmp_path):
    path = write_csv(tmp_path / "m.csv", [{"audio": "a.wav"}, {"audio": "/abs.wav"}])
    uri = path.as_uri()  # file:///.../m.csv goes through the URI branch
    assert read_manifest(uri)["audio"].to_pylist() == [f"{tmp_path.as_uri()}/a.wav", "/abs.wav"]


# ---------------------------------------------------------------- errors


def _error(path) -> str:
    with pytest.raises(ManifestError) as ei:
        read_manifest(str(path))
    message = str(ei.value)
    assert "\n" not in message
    assert str(path) in message, f"message does not name the file: {message}"
    return message


def test_missing_audio_column_lists_columns(tmp_path, fmt):
    path = make(tmp_path, fmt, [{"path": "/a.wav", "lang": "en"}])
    message = _error(path)
    assert "'audio'" in message
    assert "columns are: path, lang" in message


def test_header_only_csv(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("audio,id,language\n")
    assert "no rows" in _error(path)


def test_empty_parquet(tmp_path):
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"audio": pa.array([], pa.string())}), path)
    assert "no rows" in _error(path)


@pytest.mark.parametrize("name", ["m.csv", "m.jsonl"])
def test_zero_byte_manifest(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"")
    assert "empty" in _error(path).lower()


def test_blank_audio_rows_are_reported_with_line_numbers(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("audio,id\n/a.wav,1\n,2\n/c.wav,3\n   ,4\n")
    message = _error(path)
    assert "2 row(s) with an empty 'audio'" in message
    assert "rows 3, 5" in message  # file line numbers (header is line 1)


def test_blank_audio_in_jsonl(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"audio": "/a.wav"}, {"audio": None}, {"audio": ""}])
    assert "2 row(s) with an empty 'audio'" in _error(path)


@pytest.mark.parametrize("name", ["m.csv", "m.jsonl"])
def test_non_utf8_manifest(tmp_path, name):
    path = tmp_path / name
    text = "audio\ncafé.wav\n" if name.endswith(".csv") else '{"audio": "café.wav"}\n'
    path.write_bytes(text.encode("latin-1"))
    message = _error(path)
    assert "UTF-8" in message


def test_duplicate_explicit_ids(tmp_path, fmt):
    rows = [{"audio": "/a.wav", "id": "1"}, {"audio": "/b.wav", "id": "2"}, {"audio": "/c.wav", "id": "1"}]
    message = _error(make(tmp_path, fmt, rows))
    assert "duplicate id" in message and "'1'" in message and "'2'" not in message


def test_same_file_twice_without_ids_is_a_duplicate(tmp_path):
    path = write_csv(tmp_path / "m.csv", [{"audio": "/a.wav"}, {"audio": "/a.wav"}])
    assert stable_id("/a.wav") in _error(path)


def test_filled_id_colliding_with_explicit_id(tmp_path):
    rows = [{"audio": "/a.wav", "id": stable_id("/b.wav")}, {"audio": "/b.wav", "id": ""}]
    assert "duplicate id" in _error(write_csv(tmp_path / "m.csv", rows))


def test_unknown_extension(tmp_path):
    path = tmp_path / "m.txt"
    path.write_text("audio\n/a.wav\n")
    message = _error(path)
    assert ".csv" in message and ".jsonl" in message and ".parquet" in message


@pytest.mark.parametrize("name", ["nope.csv", "nope.jsonl", "nope.parquet"])
def test_nonexistent_manifest(tmp_path, name):
    assert "not found" in _error(tmp_path / "missing_dir" / name)


def test_invalid_json_lines(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"audio": "/a.wav"}\nnot json at all\n')
    message = _error(path)
    assert "not valid JSON" in message


def test_not_a_parquet_file(tmp_path):
    path = tmp_path / "m.parquet"
    path.write_text("audio\n/a.wav\n")
    assert "PARQUET" in _error(path).upper()


def test_json_lines_errors_count_lines_from_one_as_csv_does(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"audio": "/a.wav"}\n{"audio": "/b.wav"\n')
    assert "line 2 is not valid JSON" in _error(path)
    path.write_text('{"audio": "/a.wav"}\n["/b.wav"]\n')
    assert "line 2 is not a JSON object" in _error(path)
    csv_path = tmp_path / "m.csv"
    csv_path.write_text("audio\n/a.wav\n \n")
    jsonl_path = tmp_path / "n.jsonl"
    jsonl_path.write_text('{"audio": "/a.wav"}\n{"audio": " "}\n')
    assert "(rows 3)" in _error(csv_path) and "(rows 2)" in _error(jsonl_path)  # the file's own line numbers


@pytest.mark.parametrize("name", ["m.csv", "m.tsv"])
def test_tab_separated_manifests_are_read_whatever_their_name(tmp_path, name):
    path = tmp_path / name
    path.write_text("id\taudio\tlanguage\n007\t/x/a, b.wav\ten\n")
    table = read_manifest(str(path))
    assert table.to_pylist() == [{"id": "007", "audio": "/x/a, b.wav", "language": "en", "prompt": None}]


def test_a_prompt_column_is_kept_per_row_and_blank_prompts_are_none(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text('audio,prompt\n/a.wav,ComfyUI nodes\n/b.wav,  \n')
    assert read_manifest(str(path))["prompt"].to_pylist() == ["ComfyUI nodes", None]


def test_default_ids_tell_urls_apart_by_every_parameter_but_their_signature(tmp_path):
    """Stored URIs mask every query value that is not known to be harmless, but ids hash the URL without only
    its password and signing parameters: ?file=a and ?file=b stay two rows, a re-signed URL keeps its id."""
    signed = "https://host/get?file=a.mp3&X-Amz-Signature=aaa&X-Amz-Date=20261201"
    resigned = "https://host/get?file=a.mp3&X-Amz-Signature=bbb&X-Amz-Date=20261204"
    other = "https://host/get?file=b.mp3&X-Amz-Signature=aaa&X-Amz-Date=20261201"
    assert stable_id(signed) == stable_id(resigned) != stable_id(other)
    path = tmp_path / "m.csv"
    path.write_text(f"audio\n{signed}\n{other}\n")
    table = read_manifest(str(path))
    assert table["id"].to_pylist() == [stable_id(signed), stable_id(other)]  # not a duplicate id
