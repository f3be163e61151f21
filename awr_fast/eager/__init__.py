"""The eager backend: each op in fast eager PyTorch (the factored refinement of SPEC §3b, triangular row
blocks, length buckets), with the reference's signature. What it runs is listed in the op's CAPABILITIES
(awr_fast.ops); "auto" picks it for CPU tensors. This package imports no other backend.
"""
