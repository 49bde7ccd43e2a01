"""How big the model actor pool and its batches are on the cluster at hand, and the environment its CPU actors
start with: pure functions, tested without Ray."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import ResourceOptions, int8_on_gpu
from ..errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Resources:
    """The actor pool and batch geometry chosen for the cluster at hand."""

    batch_size: int
    min_actors: int
    max_actors: int
    gpus_per_actor: float
    cpus_per_actor: float
    cpu_threads: int  # torch threads of a model actor running on CPU
    decode_cpus: float = 1.0  # CPUs each decode task reserves (DECODE_CPUS)


# Automatic batch size: as many chunks as fit these bytes of decoder cross-attention cache (the memory a
# batch holds through its whole decoding), up to the cap. Larger batches share each decoder step's weight
# reads: tiny.en's decoder from memory on 92 min of speech, 2 AMD EPYC cores (AVX512-BF16), bfloat16, took
# 86.5 s at batch 16 and 77.7 s at 32, the same WER (docs/performance.md#the-cpu-batch-of-32).
BATCH_MEMORY = {"cpu": (2 << 30, 32), "gpu": (8 << 30, 32)}
# CPUs a decode task reserves. A model on CPU runs torch on every core of its node (torch_threads), so a decode
# task beside it gets a share of a core whatever it reserves, and one task per CPU left free fell behind: the
# model waited for chunks. Two per CPU keep it fed (tiny.en, 92 min in 10 files, 2 AMD EPYC cores, alternated:
# 85.9, 84.4, 87.5 s -> 82.1, 83.2, 81.6 s; docs/performance.md). A model on a GPU leaves each task its core.
DECODE_CPUS = {"cpu": 0.5, "gpu": 1.0}
# Serve on CPU keeps batches of at most 16: there a batch's time is every request's wait in it (twice as
# long at 32 for ~10% more throughput), and its admission limits and overload measurements are at 16.
ONLINE_CPU_BATCH = 16


# The environment of a CPU model actor's process (its runtime_env's env_vars; Ray merges them with the job's).
# glibc gives each thread that allocates an arena of its own, and a thread's arena other than the main one
# cannot hold a block over 64 MB: glibc then maps fresh pages for it whatever runtime.keep_freed_memory set.
# Ray Data and Serve call the model from a pool thread, so without this every batch faulted its attention
# tensors in again (tiny.en, 2 cores, 30 min of speech: 2.3 M page faults, 25 s of system time; 1.2 s in one thread
# of one process). One arena for the whole process keeps them; it must be set before the process starts.
CPU_ACTOR_ENV = {"MALLOC_ARENA_MAX": "1"}


def model_actor_options(dtype: str, gpus: float, gpu_flag: str) -> dict[str, Any]:
    """The Ray options of a model actor (or Serve replica) beyond its CPU and GPU counts, once its GPUs are known
    (automatic GPUs resolve against the cluster, after the options' own checks): a CPU one starts with
    CPU_ACTOR_ENV; --dtype int8 on a GPU is refused, naming `gpu_flag`, the option that keeps it on CPU."""
    refused = int8_on_gpu(dtype, gpus, gpu_flag)
    if refused:
        raise ConfigError(refused)
    return {} if gpus > 0 else {"runtime_env": {"env_vars": dict(CPU_ACTOR_ENV)}}


def cross_cache_bytes(model_config: dict[str, Any], gpu: bool) -> int:
    """Bytes of decoder cross-attention cache one chunk holds through its whole decoding: keys and values,
    every decoder layer, 1500 encoder positions, in float16 on a GPU and float32 on CPU."""
    return (2 * int(model_config["decoder_layers"]) * int(model_config.get("max_source_positions", 1500))
            * int(model_config["d_model"]) * (2 if gpu else 4))


def auto_batch_size(gpu: bool, model_config: dict[str, Any] | None, online: bool = False) -> int:
    """Chunks per model call for a model (its transformers config.json) on a GPU (fp16) or CPU (fp32);
    `online`: for a Serve replica (ONLINE_CPU_BATCH on CPU)."""
    budget, cap = BATCH_MEMORY["gpu" if gpu else "cpu"]
    if online and not gpu:
        cap = min(cap, ONLINE_CPU_BATCH)
    if not model_config:
        return cap
    return max(1, min(cap, budget // cross_cache_bytes(model_config, gpu)))


def parameters(config: dict[str, Any]) -> int:
    """The parameter count of a Whisper checkpoint from its config (embeddings and positions included, the
    output projection tied to the token embedding)."""
    d, mels = int(config["d_model"]), int(config["num_mel_bins"])
    attention = 4 * d * d + 3 * d  # q, k, v, out; k has no bias

    def ffn(width: int) -> int:
        return 2 * d * width + width + d

    encoder = (mels * d * 3 + d) + (d * d * 3 + d) + int(config["max_source_positions"]) * d + 2 * d + \
        int(config["encoder_layers"]) * (attention + ffn(int(config["encoder_ffn_dim"])) + 4 * d)
    decoder = (int(config["vocab_size"]) + int(config["max_target_positions"])) * d + 2 * d + \
        int(config["decoder_layers"]) * (2 * attention + ffn(int(config["decoder_ffn_dim"])) + 6 * d)
    return encoder + decoder


@dataclass(frozen=True)
class GpuPlan:
    """What one model actor of a checkpoint needs on a GPU in float16, computed from its config (not measured)."""

    parameters: int
    weights_bytes: int  # float16
    batch_size: int  # the automatic --batch-size on a GPU
    actor_bytes: int  # weights and the decoder caches of one full batch
    gpus_per_actor: float  # a suggested --gpus-per-actor on a GPU of the given memory


def gpu_plan(config: dict[str, Any], gpu_bytes: int = 24 << 30, most_per_gpu: int = 4) -> GpuPlan:
    """One actor's share of a GPU of `gpu_bytes`: as many actors as fit 90% of its memory, at most
    `most_per_gpu` (beyond that they compete for the same compute), as --gpus-per-actor = 1 / actors."""
    params, batch = parameters(config), auto_batch_size(True, config)
    self_cache = 2 * int(config["decoder_layers"]) * int(config["max_target_positions"]) * int(config["d_model"]) * 2
    need = 2 * params + batch * (cross_cache_bytes(config, True) + self_cache)
    actors = max(1, min(most_per_gpu, int(0.9 * gpu_bytes // need)))
    return GpuPlan(params, 2 * params, batch, need, round(1 / actors, 2))


def torch_threads(cpus_per_model: float, node_cpus: list[float], models: int) -> int:
    """The torch threads of each of `models` CPU models (batch actors or Serve replicas) spread over nodes with
    these CPUs: its share of the smallest node, at least the CPUs it reserves."""
    nodes = [c for c in node_cpus if c > 0] or [1.0]
    per_node = max(1, math.ceil(models / len(nodes)))
    return max(math.ceil(cpus_per_model), int(min(nodes)) // per_node, 1)


def plan_resources(
    options: ResourceOptions,
    cluster: dict[str, float],
    node_cpus: list[float] | None = None,
    model_config: dict[str, Any] | None = None,
) -> Resources:
    """Fill in the automatic options from the cluster's resources and the model's size.

    `node_cpus` lists the CPUs of each node. A model actor on CPU reserves --cpus-per-actor for Ray's
    accounting (so decode tasks always find a CPU) but runs torch on its share of the node: on a 2-core
    machine one actor with 2 threads is 1.4x faster than with 1, and decode work is light enough to interleave."""
    gpus = float(cluster.get("GPU", 0))
    gpus_per_actor = options.gpus_per_actor if options.gpus_per_actor is not None else (1.0 if gpus >= 1 else 0.0)
    if gpus_per_actor > 0 and gpus == 0:
        # An autoscaling cluster starts GPU nodes for pending actors; it must be told the pool size.
        if options.max_actors is None:
            raise ConfigError(
                f"--gpus-per-actor {gpus_per_actor} asks for GPUs, but the cluster has none (on an autoscaling "
                "cluster whose GPU nodes start at zero, also give --max-actors)"
            )
        log.warning("the cluster has no GPU yet: model actors wait until the autoscaler adds GPU nodes")
    if options.max_actors is not None:
        max_actors = options.max_actors
    elif gpus_per_actor > 0:
        max_actors = max(options.min_actors, int(math.floor(gpus / gpus_per_actor + 1e-9)))
    else:
        max_actors = options.min_actors
    batch_size = options.batch_size or auto_batch_size(gpus_per_actor > 0, model_config)
    cpu_threads = torch_threads(options.cpus_per_actor, node_cpus or [cluster.get("CPU", 1)], max_actors)
    return Resources(batch_size, options.min_actors, max_actors, gpus_per_actor, options.cpus_per_actor, cpu_threads,
                     DECODE_CPUS["gpu" if gpus_per_actor > 0 else "cpu"])


def whisper_sizes() -> dict[str, dict[str, Any]]:
    """The config fields of the published Whisper sizes (data/whisper_sizes.json), by name."""
    sizes = json.loads((Path(__file__).parents[1] / "data" / "whisper_sizes.json").read_text())
    return {name: config for name, config in sizes.items() if not name.startswith("_")}


def gpu_sizing_table(gpu_bytes: int = 24 << 30) -> str:
    """The README's GPU sizing table (markdown), computed by gpu_plan from each size's config."""
    rows = ["| model | parameters | float16 weights | --batch-size (auto) | memory per actor | --gpus-per-actor |",
            "|---|---|---|---|---|---|"]
    for name, config in whisper_sizes().items():
        plan = gpu_plan(config, gpu_bytes)
        rows.append(f"| {name} | {plan.parameters / 1e6:.0f} M | {plan.weights_bytes / 2**30:.2f} GiB | {plan.batch_size} "
                    f"| {plan.actor_bytes / 2**30:.1f} GiB | {plan.gpus_per_actor:g} |")
    return "\n".join(rows)
