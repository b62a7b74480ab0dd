import contextlib

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def assert_close(actual, expected, rtol=1e-5, atol=1e-6, what="tensor"):
    """Relative-error comparison with NaN checks (a NaN anywhere fails, with where)."""
    assert not torch.isnan(actual).any(), f"{what}: NaN in result at {torch.isnan(actual).nonzero()[:5].tolist()}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


@contextlib.contextmanager
def deterministic(warn_only: bool = False):
    """torch.use_deterministic_algorithms(True) inside the block, the previous setting after."""
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(True, warn_only=warn_only)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


INTERPRET = __import__("os").environ.get("TRITON_INTERPRET") == "1"
CUDA = torch.cuda.is_available()
# Triton tests run on CUDA where there is a GPU, else on CPU tensors through Triton's interpreter.
TRITON_DEVICE = "cuda" if CUDA else "cpu"


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "triton" in item.keywords and not (CUDA or INTERPRET):
            item.add_marker(pytest.mark.skip(reason="Triton kernels need a GPU or TRITON_INTERPRET=1"))
        if "gpu" in item.keywords and not CUDA:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))
