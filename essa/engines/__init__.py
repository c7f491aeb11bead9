"""Engines generate completions for a population of candidates; they know nothing of strategies."""

from essa.engines.hf import Generation, HFEngine

__all__ = ["Generation", "HFEngine"]
