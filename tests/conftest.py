import pytest
import torch


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch: no cache entries or recompile budget left by another test."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
