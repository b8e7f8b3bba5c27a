"""Baselines that ADSC is measured against (``adsc bench``); not part of the ADSC runtime."""

from .fastv import FastV, budget_keep

__all__ = ["FastV", "budget_keep"]
