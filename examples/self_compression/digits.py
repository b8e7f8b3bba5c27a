"""The study's data: 4x4 mosaics of scikit-learn's bundled 8x8 handwritten digits (UCI optical
recognition of handwritten digits; shipped inside scikit-learn, nothing is downloaded), with
questions that need spatial detail, in LLaVA's instruction format.

- ``Read the digits.`` -> the 16 digits in reading order, a space between rows
  (``"3710 2251 0987 6543"``): every cell's detail is needed, in its place.

The 1797 digit images are split once (``data_seed``) into a training pool (70 %) and a held-out pool
(30 %); training mosaics use only training digits, test mosaics only held-out ones, so a test image
is never seen in training. A mosaic is 32 x 32 pixels (grey, stored as RGB PNG).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Tuple

import numpy as np

SIDE = 4  # digits per mosaic row / column
DIGIT = 8  # pixels per digit side
QUESTIONS = ("read",)


def _pools(data_seed: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = (d.images * (255.0 / 16.0)).round().astype(np.uint8)  # [1797, 8, 8], 0..16 -> 0..255
    order = np.random.default_rng(data_seed).permutation(len(images))
    cut = int(0.7 * len(images))
    tr, te = order[:cut], order[cut:]
    return images[tr], d.target[tr], images[te], d.target[te]


def _question(kind: str, r: int, c: int) -> str:
    return "Read the digits."


def _answer(kind: str, grid: np.ndarray, r: int, c: int) -> str:
    return " ".join("".join(str(int(d)) for d in row) for row in grid)


def make_split(folder: Path, name: str, n: int, images: np.ndarray, labels: np.ndarray, seed: int) -> List[dict]:
    """``n`` samples: mosaics saved under ``folder/images/{name}-{i}.png``, one question each (the
    kinds alternate, so both have ``n / 2``); returns the LLaVA-format rows (``answer`` and
    ``kind`` are kept for scoring)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        pick = rng.integers(0, len(images), SIDE * SIDE)
        grid = labels[pick].reshape(SIDE, SIDE)
        mosaic = images[pick].reshape(SIDE, SIDE, DIGIT, DIGIT).transpose(0, 2, 1, 3).reshape(SIDE * DIGIT, SIDE * DIGIT)
        file = f"{name}-{i}.png"
        Image.fromarray(np.repeat(mosaic[..., None], 3, axis=2), "RGB").save(folder / "images" / file)
        kind = QUESTIONS[i % len(QUESTIONS)]
        r, c = int(rng.integers(SIDE)), int(rng.integers(SIDE))
        question, answer = _question(kind, r, c), _answer(kind, grid, r, c)
        rows.append({"id": f"{name}-{i}", "image": file, "kind": kind, "answer": answer,
                     "conversations": [{"from": "human", "value": f"<image>\n{question}"},
                                       {"from": "gpt", "value": answer}]})
    return rows


def make_dataset(folder, n_train: int, n_test: int, data_seed: int = 0):
    """Write ``train.json`` / ``test.json`` and the images under ``folder``; returns the two lists."""
    folder = Path(folder)
    tr_img, tr_lab, te_img, te_lab = _pools(data_seed)
    train = make_split(folder, "train", n_train, tr_img, tr_lab, data_seed + 1)
    test = make_split(folder, "test", n_test, te_img, te_lab, data_seed + 2)
    (folder / "train.json").write_text(json.dumps(train))
    (folder / "test.json").write_text(json.dumps(test))
    return train, test
