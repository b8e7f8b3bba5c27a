"""Baselines that ADSC is measured against (``adsc bench``, the lmms-eval plugin): FastV."""

from .fastv import FastV, budget_keep

__all__ = ["FastV", "budget_keep"]
