"""plan_resources: the actor pool and batch size chosen for a cluster (pure, no Ray)."""

from __future__ import annotations

import logging

import pytest

from ray_whisper.config import ConfigError, TranscribeOptions
from ray_whisper.model.resources import CPU_ACTOR_ENV, model_actor_options, plan_resources


def plan(cluster, node_cpus=None, **options):
    return plan_resources(TranscribeOptions(**options).resources, cluster, node_cpus)


def test_cpu_only_cluster_runs_one_cpu_actor_with_the_node_cores():
    res = plan({"CPU": 2.0}, [2.0])
    assert (res.gpus_per_actor, res.min_actors, res.max_actors) == (0.0, 1, 1)
    assert res.batch_size == 32 and res.cpus_per_actor == 1.0
    assert res.cpu_threads == 2  # the one actor uses both cores of its node
    assert res.decode_cpus == 0.5  # two decode tasks per CPU beside a model that takes every core


def test_decode_tasks_reserve_a_whole_cpu_beside_a_gpu_model():
    assert plan({"CPU": 32.0, "GPU": 4.0}, [8.0] * 4).decode_cpus == 1.0
    assert plan({"CPU": 8.0}, [8.0], gpus_per_actor=1, max_actors=2).decode_cpus == 1.0  # GPUs on their way


def test_four_gpus_give_four_actors_of_one_gpu():
    res = plan({"CPU": 32.0, "GPU": 4.0}, [8.0] * 4)
    assert (res.gpus_per_actor, res.min_actors, res.max_actors) == (1.0, 1, 4)
    assert res.batch_size == 32


def test_half_a_gpu_per_actor_packs_two_actors_per_gpu():
    assert plan({"CPU": 32.0, "GPU": 4.0}, gpus_per_actor=0.5).max_actors == 8
    assert plan({"CPU": 8.0, "GPU": 1.0}, gpus_per_actor=0.5).max_actors == 2
    # fractions that do not divide evenly round down: 3 / 0.4 = 7.5 -> 7 actors fit
    assert plan({"CPU": 8.0, "GPU": 3.0}, gpus_per_actor=0.4).max_actors == 7


def test_explicit_pool_bounds_win():
    assert plan({"CPU": 32.0, "GPU": 4.0}, max_actors=2).max_actors == 2
    res = plan({"CPU": 32.0, "GPU": 4.0}, min_actors=2, max_actors=16)
    assert (res.min_actors, res.max_actors) == (2, 16)
    # min_actors above what the GPUs allow raises the ceiling to it (the pool waits for GPUs)
    assert plan({"CPU": 32.0, "GPU": 4.0}, min_actors=6).max_actors == 6
    assert plan({"CPU": 8.0}, min_actors=2, max_actors=3).max_actors == 3
    assert plan({"CPU": 8.0, "GPU": 2.0}, batch_size=12).batch_size == 12


def test_gpus_per_actor_zero_keeps_actors_on_cpu_on_a_gpu_cluster():
    res = plan({"CPU": 16.0, "GPU": 2.0}, [16.0], gpus_per_actor=0)
    assert (res.gpus_per_actor, res.max_actors, res.batch_size) == (0.0, 1, 32)


def test_int8_with_automatic_gpus_on_a_gpu_cluster_is_refused_naming_the_option_that_keeps_it_on_cpu():
    # --dtype int8 alone passes the options' own check (no GPUs asked for); the cluster's GPUs give the actors one
    opts = TranscribeOptions(dtype="int8")
    res = plan_resources(opts.resources, {"CPU": 16.0, "GPU": 2.0}, [16.0])
    assert res.gpus_per_actor == 1.0
    with pytest.raises(ConfigError, match="--dtype int8 runs on CPU only .* give --gpus-per-actor 0"):
        model_actor_options(opts.decoding.dtype, res.gpus_per_actor, "--gpus-per-actor")
    on_cpu = plan_resources(TranscribeOptions(dtype="int8", gpus_per_actor=0).resources, {"CPU": 16.0, "GPU": 2.0}, [16.0])
    assert model_actor_options("int8", on_cpu.gpus_per_actor, "--gpus-per-actor") == {
        "runtime_env": {"env_vars": CPU_ACTOR_ENV}}
    assert model_actor_options("float16", 1.0, "--gpus-per-actor") == {}  # a GPU actor keeps the job's environment


def test_asking_for_gpus_on_a_cluster_without_any_fails_before_running():
    with pytest.raises(ConfigError, match="--max-actors"):
        plan({"CPU": 8.0}, gpus_per_actor=1)


def test_autoscaling_cluster_with_gpu_nodes_at_zero_uses_the_given_pool_size(caplog):
    """cluster.yaml's GPU group starts at min_workers 0: at submit time the cluster has no GPU. With
    --max-actors the plan asks for GPU actors anyway, and the autoscaler launches nodes for them."""
    with caplog.at_level(logging.WARNING, logger="ray_whisper.batch.pipeline"):
        res = plan({"CPU": 0.0}, [0.0], gpus_per_actor=1, max_actors=8)
    assert (res.gpus_per_actor, res.min_actors, res.max_actors, res.batch_size) == (1, 1, 8, 32)
    assert "autoscaler" in caplog.text


def test_cpu_threads_split_the_smallest_node_between_its_actors():
    assert plan({"CPU": 16.0}, [8.0, 8.0], max_actors=4).cpu_threads == 4  # 2 actors per 8-core node
    assert plan({"CPU": 4.0}, [4.0], cpus_per_actor=2).cpu_threads == 4
    assert plan({"CPU": 1.0}, [1.0], max_actors=3).cpu_threads == 1
    # a head with no CPUs (cluster.yaml's) does not count as a node actors can run on
    assert plan({"CPU": 8.0}, [0.0, 8.0]).cpu_threads == 8


TINY = {"d_model": 384, "decoder_layers": 4, "max_source_positions": 1500}
LARGE_V3 = {"d_model": 1280, "decoder_layers": 32, "max_source_positions": 1500}


def test_automatic_batch_size_fits_the_models_decoder_cache_in_memory():
    """A batch holds 2 x layers x 1500 x d_model cross-attention values per window through its decoding:
    tiny gets the cap on either device; large-v3 in fp32 on CPU (491 MB a window) only 4 in 2 GiB. A Serve
    replica on CPU at most 16 (online: a batch's time is each request's wait)."""
    from ray_whisper.model.resources import auto_batch_size

    assert plan({"CPU": 2.0}, [2.0]).batch_size == 32
    assert plan_resources(TranscribeOptions().resources, {"CPU": 2.0}, [2.0], TINY).batch_size == 32
    assert (auto_batch_size(False, TINY, online=True), auto_batch_size(True, TINY, online=True)) == (16, 32)
    assert auto_batch_size(False, LARGE_V3, online=True) == 4
    assert plan_resources(TranscribeOptions().resources, {"CPU": 2.0}, [2.0], LARGE_V3).batch_size == 4
    assert plan_resources(TranscribeOptions().resources, {"CPU": 8.0, "GPU": 1.0}, [8.0], LARGE_V3).batch_size == 32
    assert plan_resources(TranscribeOptions(batch_size=3).resources, {"CPU": 2.0}, [2.0], LARGE_V3).batch_size == 3


@pytest.mark.slow
def test_the_parameter_count_from_a_config_is_the_checkpoints_own(bundled_model, multilingual_model):
    """gpu_plan's arithmetic starts from the parameter count: computed from config.json, it must equal the
    number of weights in the real checkpoints (tiny.en, and the multilingual base)."""
    import json
    from pathlib import Path

    from ray_whisper.model.network import read_state_dict
    from ray_whisper.model.resources import parameters

    for path in (bundled_model, multilingual_model):
        config = json.loads((Path(path) / "config.json").read_text())
        assert parameters(config) == sum(t.numel() for t in read_state_dict(Path(path)).values()), path


def test_the_gpu_sizing_table_is_computed_with_the_automatic_batch_size():
    from ray_whisper.model.resources import auto_batch_size, gpu_plan, gpu_sizing_table, whisper_sizes

    sizes = whisper_sizes()
    assert {"tiny", "base", "small", "medium", "large-v3", "large-v3-turbo"} <= set(sizes)
    plans = {name: gpu_plan(config) for name, config in sizes.items()}
    for name, plan in plans.items():
        assert plan.batch_size == auto_batch_size(True, sizes[name]), name  # one computation for both
        assert plan.weights_bytes == 2 * plan.parameters and plan.actor_bytes > plan.weights_bytes
        assert 0 < plan.gpus_per_actor <= 1
    # the published sizes, in millions (openai/whisper's model card rounds them)
    published = {"tiny": 39, "base": 74, "small": 244, "medium": 769, "large-v3": 1550, "large-v3-turbo": 809}
    for name, millions in published.items():
        assert abs(plans[name].parameters / 1e6 - millions) / millions < 0.05, name
    assert plans["large-v3"].gpus_per_actor == 1 and plans["tiny"].gpus_per_actor < 1  # large fills a 24 GB GPU
    assert gpu_plan(sizes["large-v3"], 80 << 30).gpus_per_actor < 1  # an 80 GB GPU takes several
    table = gpu_sizing_table()
    assert all(f"| {name} |" in table for name in sizes)


def test_the_docs_show_the_computed_gpu_sizing_table():
    from pathlib import Path

    from ray_whisper.model.resources import gpu_sizing_table

    root = Path(__file__).resolve().parents[1]
    features, readme = (root / "docs/features.md").read_text(), (root / "README.md").read_text()
    assert gpu_sizing_table() in features and "not measured" in features
    assert "docs/features.md#gpu-sizing" in readme and "not measured" in readme
