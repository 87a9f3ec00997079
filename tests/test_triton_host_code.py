"""The Triton kernels' host code as a compiled graph meets it, on the CPU.

On CUDA the attention ops (``torch.library.triton_op``) take the Triton kernels, and Inductor traces
their host code, which plans each launch from the shapes: a guard made there lands in dynamo's shape
environment, and a decision a symbolic size cannot make fails the compile. On the CPU the ops take the
PyTorch reference, so such bugs showed only on the GPU. Here the ops take the Triton branch on CPU
tensors with each launch recorded instead of run (outputs uninitialised): the graphs compiled are
counted, not their results checked (the kernels' results: ``test_triton_kernels.py``).
"""
from __future__ import annotations

import os

import pytest
import torch

import fbcompile
from fbcompile import ops

triton_attention = pytest.importorskip("fbcompile.kernels.triton_attention")
SLOW = os.environ.get("FBCOMPILE_SLOW") == "1"


class RecordedLaunch:
    """Stands in for ``wrap_triton``: a launch is traced up to its grid and arguments, not run."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        return lambda *args, **meta: None


def _graphs_compiled(monkeypatch, make, run, triton: bool, refresh: str = "block", cuda_graphs: bool = False) -> int:
    """Graphs fbcompile compiled (with Inductor) over ``run(model)``, the ops on the Triton branch or not
    (with ``cuda_graphs``, here without a GPU, only the compile is as under CUDA graphs)."""
    if triton:
        monkeypatch.setattr(ops, "_use_triton", lambda q, k, v, mask: triton_attention.supports(q, k, v, mask))
        monkeypatch.setattr(triton_attention, "wrap_triton", RecordedLaunch)
    torch._dynamo.reset()  # dynamo keeps which sizes changed per code object: each count starts afresh
    model = fbcompile.optimize(make(), fbcompile.Config(refresh=refresh, cuda_graphs=cuda_graphs))
    # the on-disk caches key graphs by op name: a graph compiled here must not serve a real run elsewhere
    # (config.patch, not monkeypatch: undoing a config module's setattr deletes the option)
    with torch.no_grad(), torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        run(model)
    monkeypatch.undo()
    return fbcompile.stats(model).compiles


PROMPT = torch.randint(0, 100, (1, 41), generator=torch.Generator().manual_seed(3))


@pytest.mark.filterwarnings("error:fbcompile. Inductor could not compile")
def test_a_shrinking_query_compiles_a_graph_per_power_of_two(monkeypatch):
    """Fast-dLLM's Dream queries every row after its prefix cache, a block fewer at each block. With the
    Triton kernels' launch plan made for a power-of-two bucket of the packed rows, the step graphs are the
    first (static) one and one per bucket: 2 x 128..16 queries (2 query heads per KV head) fall in 4
    buckets, 6 graphs with the prefill (3 on the reference branch). The plan made an int of the query
    count until ``b5cd931``: a graph per block (9), as measured on the H100
    (``benchmarks/results/dream_first_call_h100.md``)."""
    from examples import dream_lm

    make = lambda: dream_lm.make_tiny_model(num_layers=1)  # noqa: E731
    assert make().config.num_heads == 2 * make().config.num_kv_heads
    run = lambda m: m.generate(PROMPT, gen_length=128, block_size=16, steps=32)  # noqa: E731
    assert _graphs_compiled(monkeypatch, make, run, triton=True, refresh="always") == 6


@pytest.mark.filterwarnings("error:fbcompile. Inductor could not compile")
@pytest.mark.filterwarnings("ignore:.*CUDA graphs")
def test_under_cuda_graphs_one_graph_serves_every_query_length(monkeypatch):
    """Under CUDA graphs Inductor keeps the ops opaque, so their launch plans, made at each call (at
    capture only, once captured), add no guards: Dream's steps compile as on the reference branch, the
    prefill, the first step and one graph for the later ones (3; block mode, whose refresh and reuse
    graphs each met a bucket's plan)."""
    from examples import dream_lm

    make = lambda: dream_lm.make_tiny_model(num_layers=1)  # noqa: E731
    run = lambda m: m.generate(PROMPT, gen_length=128, block_size=16, steps=32)  # noqa: E731
    assert _graphs_compiled(monkeypatch, make, run, triton=True, cuda_graphs=True) == 3


def _loops():
    """(name, model, its generation loop, graphs the Triton branch adds: the row buckets of a shrinking query)."""
    from examples import block_diffusion_lm, fast_dllm_v2_lm, llada_lm, olmo_llada_lm, sdar_lm

    fast_dllm = dict(gen_length=128, block_size=16, steps=32)
    short = PROMPT[:, :9]
    return [
        ("example-lm", block_diffusion_lm.make_tiny_model, lambda m: m.generate(short, num_blocks=5, steps=4), 0),
        ("olmo-prefix", olmo_llada_lm.make_tiny_model, lambda m: m.generate(PROMPT, cache="prefix", **fast_dllm), 3),
        ("llada-prefix", llada_lm.make_tiny_model, lambda m: m.generate(PROMPT, cache="prefix", **fast_dllm), 3),
        ("llada-dual", llada_lm.make_tiny_model, lambda m: m.generate(PROMPT, cache="dual", **fast_dllm), 0),
        ("sdar", sdar_lm.make_tiny_model, lambda m: m.generate(short, num_blocks=4), 0),
        ("fast-dllm-v2", fast_dllm_v2_lm.make_tiny_model, lambda m: m.generate(short, num_blocks=4, sub_block=8), 0),
    ]


@pytest.mark.skipif(not SLOW, reason="~25 s per loop; FBCOMPILE_SLOW=1 runs them")
@pytest.mark.filterwarnings("error:fbcompile. Inductor could not compile")
@pytest.mark.parametrize("index", range(6), ids=["example-lm", "olmo-prefix", "llada-prefix", "llada-dual", "sdar",
                                                 "fast-dllm-v2"])
def test_the_triton_branch_compiles_the_graphs_of_the_reference(monkeypatch, index):
    """Block mode over the example loops: the Triton branch compiles as many graphs as the reference
    branch, but for the row buckets of a query that shrinks by a block at each block (HF DiffusionGemma is
    not here: its sampling fails on the recorded launches' uninitialised outputs)."""
    name, make, run, buckets = _loops()[index]
    one_layer = lambda: make(num_layers=1)  # noqa: E731
    reference = _graphs_compiled(monkeypatch, one_layer, run, triton=False)
    assert _graphs_compiled(monkeypatch, one_layer, run, triton=True) == reference + buckets, name


@pytest.mark.skipif(not SLOW, reason="~40 s; FBCOMPILE_SLOW=1 runs it")
@pytest.mark.filterwarnings("error:fbcompile. Inductor could not compile")
def test_a_changing_batch_compiles_a_graph_per_power_of_two(monkeypatch):
    """Requests of 1, 2, 3, 5 and 6 prompts through the example LM: the reference branch compiles its
    graphs again once, at the first new batch (dynamo makes the batch dynamic); the Triton branch does
    so too, and again for each new power-of-two bucket of the batch (3: 4, 5: 8), not for 6."""
    from examples import block_diffusion_lm

    batches = (1, 2, 3, 5, 6)
    gen = torch.Generator().manual_seed(4)

    def counted(counts: list):
        def run(model):
            for batch in batches:
                model.generate(torch.randint(0, 100, (batch, 9), generator=gen), num_blocks=3, steps=4)
                counts.append(fbcompile.stats(model).compiles)
        return run

    make = lambda: block_diffusion_lm.make_tiny_model(num_layers=1)  # noqa: E731
    reference, triton = [], []
    _graphs_compiled(monkeypatch, make, counted(reference), triton=False)
    _graphs_compiled(monkeypatch, make, counted(triton), triton=True)
    assert reference[1:] == [reference[1]] * 4 and triton[:2] == reference[:2]
    assert triton[1] < triton[2] < triton[3] == triton[4]
