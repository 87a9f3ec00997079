"""The Triton kernels' host code as a compiled graph meets it, on the CPU.

On CUDA the attention ops (``torch.library.triton_op``) take the Triton kernels, and Inductor traces
their host code, which plans each launch from the shapes: a guard made there lands in dynamo's shape
environment, and a decision a symbolic size cannot make fails the compile. On the CPU the ops take the
PyTorch reference, so such bugs showed only on the GPU. Here the ops take the Triton branch on CPU
tensors with each launch recorded instead of run (outputs uninitialised): the graphs compiled are
counted, not their results checked (the kernels' results: ``test_triton_kernels.py``).
"""
from __future__ import annotations

import pytest
import torch

import fbcompile
from fbcompile import ops

triton_attention = pytest.importorskip("fbcompile.kernels.triton_attention")


class RecordedLaunch:
    """Stands in for ``wrap_triton``: a launch is traced up to its grid and arguments, not run."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        return lambda *args, **meta: None


@pytest.mark.filterwarnings("error:fbcompile. Inductor could not compile")
@torch.no_grad()
def test_a_shrinking_query_compiles_a_graph_per_power_of_two(monkeypatch):
    """Fast-dLLM's Dream queries every row after its prefix cache, a block fewer at each block. With the
    Triton kernels' launch plan made for a power-of-two bucket of the packed rows, the step graphs are the
    first (static) one and one per bucket: 2 x 128..16 queries (2 query heads per KV head) fall in 4
    buckets, 6 graphs with the prefill. The plan made an int of the query count until ``b5cd931``: a
    graph per block (9), as measured on the H100 (``benchmarks/results/dream_first_call_h100.md``)."""
    from examples import dream_lm

    monkeypatch.setattr(ops, "_use_triton", lambda q, k, v, mask: triton_attention.supports(q, k, v, mask))
    monkeypatch.setattr(triton_attention, "wrap_triton", RecordedLaunch)
    # the on-disk caches key graphs by op name: a graph compiled here must not serve a real run elsewhere
    monkeypatch.setattr(torch._inductor.config, "fx_graph_cache", False)
    monkeypatch.setattr(torch._functorch.config, "enable_autograd_cache", False)
    model = fbcompile.optimize(dream_lm.make_tiny_model(num_layers=1), fbcompile.Config(refresh="always"))
    assert model.config.num_heads == 2 * model.config.num_kv_heads
    prompt = torch.randint(0, 100, (1, 41), generator=torch.Generator().manual_seed(3))
    model.generate(prompt, gen_length=128, block_size=16, steps=32)
    assert fbcompile.stats(model).compiles == 6
