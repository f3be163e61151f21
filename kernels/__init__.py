"""Triton kernel families of awr_fast, installed as the subpackage awr_fast.kernels."""
