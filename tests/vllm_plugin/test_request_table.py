"""The plugin's per-request table (``model.RequestTable``) on its own: it is sized by the KV
cache's block count, grows with it keeping every row (vLLM 0.34's extensible KV cache raises the
count after start-up), and falls back to the step's largest block id where the count is unknown.
The same code runs on every device; here on the CPU (and on CUDA where there is one)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")

from adsc_ext.integrations.vllm.model import RequestTable  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_table_grows_with_the_block_count_and_keeps_its_rows(device):
    table = RequestTable(num_stages=3)
    first = torch.tensor([4, 9], device=device)
    t = table.rows_for(first, num_blocks=16)
    assert t.shape == (16, 4) and t.dtype == torch.int32 and t.device.type == device
    t[first] = torch.tensor([[0, 5, 7, 3], [0, 1, 2, 0]], dtype=torch.int32, device=device)
    assert table.rows_for(first, num_blocks=16) is t  # no reallocation at the same count
    grown = table.rows_for(torch.tensor([30], device=device), num_blocks=40)
    assert grown.shape == (40, 4)
    assert grown[4].tolist() == [0, 5, 7, 3] and grown[9].tolist() == [0, 1, 2, 0]
    assert int(grown[16:].abs().sum()) == 0
    assert table.rows_for(first, num_blocks=20) is grown  # never shrinks


def test_unknown_block_count_sizes_by_the_largest_block_id():
    table = RequestTable(num_stages=2)
    assert table.rows_for(torch.tensor([3, 11]), num_blocks=None).shape == (12, 3)
    assert table.rows_for(torch.tensor([2]), num_blocks=None).shape == (12, 3)
    assert table.rows_for(torch.tensor([], dtype=torch.int64), num_blocks=None).shape == (12, 3)
