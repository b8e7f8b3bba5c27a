"""Contract test of ``adsc_ext.integrations.vllm._compat``: what the plugin relies on below
vLLM's plugin API is still there, and behaves as the plugin uses it. No engine is started (fast);
a vLLM release that moves one of these fails here first, with the name of what moved.
"""

from __future__ import annotations

import dataclasses
import inspect
from types import SimpleNamespace

import pytest
import torch

vllm = pytest.importorskip("vllm")

from adsc_ext.integrations.vllm import _compat  # noqa: E402
from adsc_ext.integrations.vllm.config import ADSC_SCHEDULER  # noqa: E402
from adsc_ext.integrations.vllm.kv_groups import AdscScheduler  # noqa: E402


def test_tested_release():
    assert vllm.__version__.startswith(_compat.TESTED_VLLM + "."), vllm.__version__


def test_entry_point_is_installed():
    from importlib.metadata import entry_points

    eps = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert eps.get("adsc") == "adsc_ext.integrations.vllm:register"


def test_register_takes_over_llava_and_is_idempotent():
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    from adsc_ext.integrations.vllm import ARCHITECTURES, register

    register()
    register()
    for arch in ARCHITECTURES:
        entry = ModelRegistry.models[arch]
        assert (entry.module_name, entry.class_name) == (
            "adsc_ext.integrations.vllm.model", "AdscLlavaForConditionalGeneration"
        )
        assert MODELS_CONFIG_MAP[arch]._adsc_hook


def _fake_context(layer_names):
    from vllm.forward_context import ForwardContext

    layers = {name: SimpleNamespace(kv_cache=torch.empty(0)) for name in layer_names}
    return ForwardContext(
        no_compile_layers=layers,
        attn_metadata={name: f"md-{name}" for name in layer_names},
        slot_mapping={name: torch.tensor([i]) for i, name in enumerate(layer_names)},
    )


def test_attention_reads_the_swapped_metadata_and_slots():
    """vLLM's attention op takes a layer's metadata and KV slots from the forward context's two
    dicts; inside ``stage_metadata_scope`` it gets the stage's, afterwards the runner's again."""
    from vllm.forward_context import override_forward_context
    from vllm.model_executor.layers.attention.attention import get_attention_context

    names = ["l0", "l1", "l2"]
    ctx = _fake_context(names)
    with override_forward_context(ctx):
        assert _compat.forward_context() is ctx
        with _compat.stage_metadata_scope(ctx) as assign:
            assign(["l1", "l2"], "stage-md", torch.tensor([7, 8]))
            md, _, _, slots = get_attention_context("l2")
            assert md == "stage-md" and slots.tolist() == [7, 8]
            md, _, _, slots = get_attention_context("l0")
            assert md == "md-l0" and slots.tolist() == [0]
        md, _, _, slots = get_attention_context("l2")
        assert md == "md-l2" and slots.tolist() == [2]
        assert _compat.layer_metadata(ctx, "l1") == "md-l1"
    assert _compat.forward_context() is None


def test_cpu_metadata_carries_the_batch_fields():
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionMetadata

    fields = {f.name for f in dataclasses.fields(CPUAttentionMetadata)}
    assert set(_compat.BATCH_FIELDS) <= fields


def test_batch_view_refuses_foreign_metadata():
    with pytest.raises(_compat.UnsupportedBackendError, match="query_start_loc"):
        _compat.batch_view(object())


def test_common_metadata_takes_what_the_plugin_passes():
    from vllm.v1.attention.backend import AttentionMetadataBuilder, CommonAttentionMetadata

    params = inspect.signature(CommonAttentionMetadata).parameters
    for name in (
        "query_start_loc", "query_start_loc_cpu", "seq_lens", "num_reqs", "num_actual_tokens",
        "max_query_len", "max_seq_len", "block_table_tensor", "slot_mapping", "causal",
        "positions", "seq_lens_cpu_upper_bound",
    ):
        assert name in params, name
    build = inspect.signature(AttentionMetadataBuilder.build).parameters
    assert "common_prefix_len" in build and "common_attn_metadata" in build
    init = list(inspect.signature(AttentionMetadataBuilder.__init__).parameters)
    assert init[1:5] == ["kv_cache_spec", "layer_names", "vllm_config", "device"]


def test_llava_processor_factories():
    from vllm.model_executor.models.llava import LlavaForConditionalGeneration

    processor, info, dummy = _compat.processor_factories(LlavaForConditionalGeneration)
    assert callable(processor) and callable(info) and callable(dummy)


def test_config_hook_runs_after_vllms_own():
    from vllm.model_executor.models import config as model_configs

    calls = []
    arch = "AdscContractTestArch"

    class Previous(model_configs.VerifyAndUpdateConfig):
        @staticmethod
        def verify_and_update_config(vllm_config):
            calls.append("vllm")

    model_configs.MODELS_CONFIG_MAP[arch] = Previous
    try:
        _compat.register_config_hook(arch, lambda cfg: calls.append("adsc"))
        _compat.register_config_hook(arch, lambda cfg: calls.append("twice"))  # idempotent
        model_configs.MODELS_CONFIG_MAP[arch].verify_and_update_config(None)
        assert calls == ["vllm", "adsc"]
    finally:
        del model_configs.MODELS_CONFIG_MAP[arch]


@pytest.mark.parametrize("kind", ["adsc", "plain"])
def test_engine_config_with_and_without_schedule(checkpoints, kind):
    """The config hook in ``VllmConfig.__post_init__``: with a schedule, prefix caching off,
    chunked prefill without split images, eager; without one, vLLM's defaults stand."""
    from vllm.engine.arg_utils import EngineArgs

    cfg = EngineArgs(
        model=str(checkpoints[kind]), dtype="float32", max_model_len=256,
        enable_prefix_caching=True, enforce_eager=False,
    ).create_engine_config()
    assert cfg.model_config.architecture == "LlavaForConditionalGeneration"
    if kind == "adsc":
        assert cfg.cache_config.enable_prefix_caching is False
        assert cfg.scheduler_config.disable_chunked_mm_input is True
        assert cfg.model_config.enforce_eager is True
        assert cfg.scheduler_config.scheduler_cls == ADSC_SCHEDULER
        assert cfg.scheduler_config.get_scheduler_cls() is AdscScheduler
        assert cfg.scheduler_config.disable_hybrid_kv_cache_manager is False
    else:
        assert cfg.cache_config.enable_prefix_caching is True
        assert cfg.model_config.enforce_eager is False
        assert cfg.scheduler_config.scheduler_cls is None


def test_stage_specs_make_one_kv_group_per_stage(checkpoints):
    """vLLM's grouping (``get_kv_cache_groups``) puts each stage's layers in a group of its own
    and each group gets the ADSC manager; a stage spec pickles (it crosses processes)."""
    import pickle

    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.core.kv_cache_utils import get_kv_cache_groups
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from adsc_ext.integrations.vllm import kv_groups

    kv_groups.register()
    from vllm.v1.kv_cache_interface import KVCacheLayout

    cfg = EngineArgs(model=str(checkpoints["adsc"]), dtype="float32", max_model_len=256).create_engine_config()
    cfg.cache_config.kv_cache_layout = KVCacheLayout.LBHNC.name  # what the engine core resolves on CPU
    base = FullAttentionSpec(block_size=32, num_kv_heads=2, head_size=32, dtype=torch.float32)
    stage_of = [0, 0, 1, 1, 2, 2]
    specs = {f"l{i}": kv_groups.stage_spec(base, s, [0, 8, 12][s], 16) for i, s in enumerate(stage_of)}
    groups = get_kv_cache_groups(cfg, dict(specs))
    assert sorted(sorted(g.layer_names) for g in groups) == [["l0", "l1"], ["l2", "l3"], ["l4", "l5"]]
    assert sorted(type(g.kv_cache_spec).__name__ for g in groups) == [
        "AdscStage0Spec", "AdscStage1Spec", "AdscStage2Spec"
    ]
    assert pickle.loads(pickle.dumps(specs["l4"])) == specs["l4"]
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    assert KVCacheSpecRegistry.get_manager_class(specs["l4"]) is kv_groups.AdscStageManager
    assert KVCacheSpecRegistry.get_manager_class(base) is not kv_groups.AdscStageManager


def test_compacted_length():
    from adsc_ext.integrations.vllm.kv_groups import compacted_length

    places = [(2, 16), (20, 32)]  # one image, then two adjacent ones
    assert compacted_length(40, places, 8, 16) == 40 - 8  # the second run is not complete yet
    assert compacted_length(52, places, 8, 16) == 52 - 24
    assert compacted_length(52, places, 0, 16) == 52


def test_engine_config_refuses_a_schedule_that_does_not_fit(checkpoints):
    from vllm.engine.arg_utils import EngineArgs

    from adsc_ext import ScheduleError

    with pytest.raises((ScheduleError, ValueError), match="does not fit"):
        EngineArgs(
            model=str(checkpoints["plain"]), dtype="float32", max_model_len=256,
            hf_overrides={"adsc_schedule": "2:4,3:4,4:2"},  # 4x4 -> 2x2 -> 1x1: no side to halve
        ).create_engine_config()
