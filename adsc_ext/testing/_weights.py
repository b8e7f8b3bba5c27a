"""What every tiny random model of :mod:`adsc_ext.testing` gets after it is built from its config."""

from __future__ import annotations

import torch


def ready_random_model(model, *, pad_token_id: int, skip: str = "embed"):
    """Scale up the weight matrices (every parameter of 2+ dims whose name does not contain
    ``skip``) to N(0, 0.1): the default init of a tiny model is small and its logits would be all
    ties. Then greedy-ready generation settings (``pad_token_id``, no EOS); returns the model."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and skip not in name:
                p.normal_(0.0, 0.1)
    model.generation_config.pad_token_id = pad_token_id
    model.generation_config.eos_token_id = None
    return model
