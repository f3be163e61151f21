"""Shared test helpers: the case factories live in awr_fast.testing (the benchmarks use them too)."""

from awr_fast.testing import left_padding_mask, random_lengths

__all__ = ["left_padding_mask", "random_lengths"]
