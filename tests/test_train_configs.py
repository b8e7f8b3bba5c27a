"""examples/accelerate: the Accelerate configs ``adsc train`` ships, read by Accelerate's own
launcher code (what ``accelerate launch --config_file`` does before it starts any process).

What this verifies without GPUs: every file parses as an Accelerate config with the engine it names,
``accelerate launch``'s argument validation accepts it, and the FSDP one turns into the environment
from which Accelerate builds its FSDP plugin (constructed here). DeepSpeed's launch environment
needs the deepspeed package (not installed here); running DDP / FSDP / ZeRO-2/3 on GPUs is owed
(docs/training.md)."""

from pathlib import Path

import pytest

pytest.importorskip("accelerate")

CONFIGS = Path(__file__).resolve().parent.parent / "examples" / "accelerate"
EXPECTED = {"ddp.yaml": "MULTI_GPU", "fsdp.yaml": "FSDP", "zero2.yaml": "DEEPSPEED", "zero3.yaml": "DEEPSPEED"}


def _launch_args(path: Path):
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    args = launch_command_parser().parse_args(["--config_file", str(path), "-m", "adsc_ext.train", "--model", "x"])
    args, _, _ = _validate_launch_command(args)
    return args


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_parses_with_its_engine(name):
    from accelerate.commands.config.config_args import ClusterConfig

    cfg = ClusterConfig.from_yaml_file(str(CONFIGS / name))
    assert cfg.distributed_type.value == EXPECTED[name]
    assert cfg.num_processes == 8 and cfg.mixed_precision == "bf16"
    args = _launch_args(CONFIGS / name)
    assert args.num_processes == 8 and args.module and args.training_script == "adsc_ext.train"
    if name.startswith("zero"):
        assert args.use_deepspeed and args.zero_stage == int(name[4])


def test_fsdp_config_builds_accelerates_fsdp_plugin(monkeypatch):
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    env = prepare_multi_gpu_env(_launch_args(CONFIGS / "fsdp.yaml"))
    assert env["ACCELERATE_USE_FSDP"] == "true"
    for k, v in env.items():
        if k.startswith(("FSDP_", "ACCELERATE_")):
            monkeypatch.setenv(k, v)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2
    assert plugin.transformer_cls_names_to_wrap == ["LlamaDecoderLayer", "CLIPEncoderLayer"]
    assert "FULL_STATE_DICT" in str(plugin.state_dict_type)
