"""Engines generate completions for a population of candidates; they know nothing of strategies."""

from essa.engines.hf import HFEngine
from essa.engines.rows import Generation

__all__ = ["Generation", "HFEngine"]
