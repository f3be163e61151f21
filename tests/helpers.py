"""Shared test helpers: the case factories live in awr_fast.testing (the benchmarks use them too)."""

from awr_fast.testing import left_padding_mask, random_lengths

__all__ = ["check_subprocess", "left_padding_mask", "random_lengths"]


def check_subprocess(res, what: str) -> None:
    """Fail with the whole tail of a subprocess's stdout and stderr (an assertion message of a tuple is
    cut by pytest's repr, which hid the C++ message of a torchrun worker's SIGABRT once)."""
    if res.returncode != 0:
        raise AssertionError(
            f"{what} exited {res.returncode}\n--- stdout\n{res.stdout[-3000:]}\n--- stderr\n{res.stderr[-8000:]}"
        )
