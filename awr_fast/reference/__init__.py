"""Readable PyTorch references (the float64 oracle). One module per op, named as in kernels/ and csrc/.

This package imports no backend.
"""
