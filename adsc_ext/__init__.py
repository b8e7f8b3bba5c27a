"""adsc_ext: ADSC (Attention-Driven Self-Compression) for LLaVA-1.5-style multimodal models.

Pure-Python pieces (schedules, plan data types, references, the ``adsc plan`` accounting) import
without the compiled extension; the ops (``stage_plan``, ``compact_tokens``) load it on first use.
"""

from importlib import import_module
from pathlib import Path

from .errors import AdscError, AdscInputError, AdscModelError
from .plan import Plan, StagePlan
from .schedule import LLAVA15_DEFAULT, Schedule, ScheduleError, StageInfo, Step

__version__ = "0.1.0"

# name -> submodule that defines it, imported on first access.
_LAZY = {
    "stage_plan": "ops",
    "compact_tokens": "ops",
    "write_paged_kv": "ops",
    "cuda_ops_available": "ops",
    "apply_adsc": "hf",
    "remove_adsc": "hf",
    "AdscCache": "hf",
    "adsc_layout": "hf",
    "StagedLayout": "layout",
    "StageMap": "layout",
    "Request": "generation",
    "SamplingParams": "generation",
    "ModelSpec": "models",
    "model_spec": "models",
}

__all__ = [
    "LLAVA15_DEFAULT", "Schedule", "ScheduleError", "Step", "StageInfo", "Plan", "StagePlan",
    "AdscError", "AdscInputError", "AdscModelError",
    "cmake_prefix_path", *_LAZY,
]


def cmake_prefix_path() -> str:
    """The prefix of the C/C++ SDK shipped in the package, for CMake's ``find_package(adsc)``."""
    prefix = Path(__file__).resolve().parent
    if not (prefix / "lib" / "cmake" / "adsc" / "adscConfig.cmake").is_file():
        raise FileNotFoundError(
            f"no CMake package under {prefix}: this install of adsc_ext has no C/C++ SDK "
            "(build it with `pip install --no-build-isolation .`)"
        )
    return str(prefix)


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'adsc_ext' has no attribute {name!r}")
    try:
        value = getattr(import_module(f".{module}", __name__), name)
    except ImportError as exc:
        if module == "ops" and "_C" in str(exc):
            raise ImportError(
                "adsc_ext's compiled extension (adsc_ext._C) is missing or broken: build it with "
                "`pip install --no-build-isolation .` against the installed torch"
                f" ({exc})"
            ) from exc
        raise
    globals()[name] = value
    return value
