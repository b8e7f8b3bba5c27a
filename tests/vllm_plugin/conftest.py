"""The vLLM plugin's tests: run on vLLM's CPU backend in their own venv (``.ci/run``'s vLLM step).

They are not part of the main suite: ``python3 -m pytest`` (no path) does not collect them, so
the main venv needs no vLLM. Name the folder to run them (``python -m pytest tests/vllm_plugin``);
where vLLM is not installed they skip. (The folder is not called ``vllm``: pytest puts ``tests/``
on ``sys.path``, where a ``vllm`` folder would shadow a missing vLLM as a namespace package.)

Each module that needs an engine loads one ``vllm.LLM`` (about a minute on 2 cores) in this
process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, executor ``uni``), so a test can reach the model
with ``LLM.apply_model``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def _named_explicitly(config) -> bool:
    for arg in config.args:
        try:
            p = Path(arg.split("::")[0]).resolve()
        except (OSError, ValueError):
            continue
        if p == HERE or HERE in p.parents:
            return True
    return False


def pytest_ignore_collect(collection_path, config):
    if not _named_explicitly(config):
        return True
    return None


os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # apply_model's function

if os.environ.get("ADSC_VLLM_CONTRACT_ONLY") == "1":
    # The contract step on a vLLM built for CUDA, on a machine without a GPU
    # (ci_contract_034.sh): vLLM's CPU platform builds the engine configs, and its x86 check for
    # triton-cpu (which only the CPU kernels need; no engine runs here) is waived.
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    try:
        import vllm.triton_utils

        vllm.triton_utils.HAS_TRITON = True
    except ImportError:  # no vLLM: the tests skip
        pass


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """``{"plain": path, "adsc": path}``: the same tiny random LLaVA, without and with
    ``adsc_schedule`` (``tiny_checkpoint.SCHEDULE``)."""
    pytest.importorskip("vllm")
    from tiny_checkpoint import SCHEDULE, build_checkpoint

    root = tmp_path_factory.mktemp("ckpt")
    return {
        "plain": build_checkpoint(root / "plain"),
        "adsc": build_checkpoint(root / "adsc", schedule=SCHEDULE),
    }


@pytest.fixture(scope="session")
def hf_tokens(checkpoints):
    """Greedy tokens of transformers' LLaVA for every request of ``REQUESTS``, each run alone:
    ``{"adsc": {name: ids}, "plain": {name: ids}}`` (``apply_adsc`` with the saved schedule, and
    the unmodified model)."""
    from tiny_checkpoint import REQUESTS, hf_greedy, load_hf, load_processor

    out = {}
    for kind, adsc in (("adsc", True), ("plain", False)):
        model = load_hf(checkpoints[kind], adsc=adsc)
        processor = load_processor(checkpoints[kind])
        out[kind] = {r.name: hf_greedy(model, processor, r) for r in REQUESTS}
    # The schedule changes what the image requests generate (else the comparisons prove little).
    assert any(out["adsc"][r.name] != out["plain"][r.name] for r in REQUESTS if r.images)
    return out
