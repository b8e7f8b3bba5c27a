"""Shared by the ``adsc train`` tests: a tiny LLaVA checkpoint with a real processor and chat
template (:mod:`adsc_ext.testing.checkpoint`), a few LLaVA-format samples with images on disk, and
a helper that runs a command with one thread per process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCHEDULE = "2:2,4:2"  # 4x4 -> 4x2 -> 2x2 vision tokens per image, 6 layers

#: small enough for a CPU, big enough to be a real run: LoRA r 8 on every LLM linear layer
TRAIN_ARGS = ["--lora-r", "8", "--lora-alpha", "16", "--lora-dropout", "0", "--no-progress", "--seed", "3",
              "--lr", "1e-3", "--warmup-ratio", "0"]


def write_images(folder: Path, n: int = 8):
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        rng = np.random.default_rng(i)
        Image.fromarray(rng.integers(0, 256, (20 + i, 24, 3), dtype=np.uint8), "RGB").save(folder / f"{i}.png")


def samples(n: int = 8):
    """Single-image, two-image (one in the middle of the text) and multi-turn rows."""
    rows = []
    for i in range(n):
        if i % 4 == 3:
            rows.append({"id": f"s{i}", "images": [f"{i}.png", f"{(i + 1) % n}.png"], "conversations": [
                {"from": "human", "value": "<image>\nleft, <image> right: same?"},
                {"from": "gpt", "value": f"no {i}"},
                {"from": "human", "value": "sure?"},
                {"from": "gpt", "value": "yes"}]})
        else:
            rows.append({"id": f"s{i}", "image": f"{i}.png", "conversations": [
                {"from": "human", "value": "<image>\nWhat is it?"},
                {"from": "gpt", "value": f"number {i}"}]})
    return rows


def make_data(root: Path, rows=None) -> Path:
    """``root/data.json`` and ``root/images``; returns the data file."""
    write_images(root / "images")
    data = root / "data.json"
    data.write_text(json.dumps(samples() if rows is None else rows))
    return data


def env1() -> dict:
    """The environment for a child process: one thread (the CI machine has 2 cores), quiet."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", TRANSFORMERS_NO_ADVISORY_WARNINGS="1", PYTHONWARNINGS="ignore")
    return env


def run(cmd, cwd=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env1(), capture_output=True, text=True, timeout=timeout)


def train_cmd(ckpt, data, out, *extra, module=True):
    head = [sys.executable, "-m", "adsc_ext.train"] if module else [sys.executable, "-m", "adsc_ext", "train"]
    return [*head, "--model", str(ckpt), "--data", str(data), "--image-folder", str(Path(data).parent / "images"),
            "--output", str(out), *TRAIN_ARGS, *extra]


def load_weights(folder) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "model.safetensors"))


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
