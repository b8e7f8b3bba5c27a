import pytest
import torch

#: "cpu" always; "cuda" runs where a GPU is present and skips cleanly elsewhere.
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[pytest.mark.cuda,
               pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")],
    ),
]
