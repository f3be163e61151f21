"""Attention layers with their parameters and initialisation, over the public functional ops."""

from .calibrated import CalibratedAttention
from .dot import RefinedMultiheadAttention
from .wasserstein import WassersteinAttention

__all__ = ["CalibratedAttention", "RefinedMultiheadAttention", "WassersteinAttention"]
