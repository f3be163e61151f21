"""The CUDA backend's ops, one module per op with the reference's signature (awr_fast.cuda.<op>.<op>).

The kernels live in csrc/<op>/ and are compiled into awr_fast._C (loaded by awr_fast._ext). Each module
here registers its ops' fake kernels (torch.compile) and autograd, and holds the entry the dispatcher
(awr_fast.backends) calls. With AWR_FAST_CUDA_EMULATE=1 the ops also take CPU tensors and run the same
block code on the host, thread by thread: that is how CI checks the kernels' arithmetic without a GPU
(correct but slow, so "auto" never picks it).
"""

import os


def emulate() -> bool:
    """Whether the CUDA backend runs its kernels' block code on CPU tensors (AWR_FAST_CUDA_EMULATE=1)."""
    return os.environ.get("AWR_FAST_CUDA_EMULATE", "0") not in ("", "0")
