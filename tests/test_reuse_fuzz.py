"""Reuse is never stale (hypothesis, stateful): random sequences of calls and cache changes against an
optimized attention layer in block mode, each call checked against a plain-PyTorch oracle.

A machine draws one zoo layer (SDPA or eager softmax; a cat - also with a graph break between it and the
attention -, a dual cache, a full-length buffer the graph writes at the block's positions or a static
cache it writes at the block's rows and reads in a window; heads first or tokens first), a refresh
policy, and whether it runs with CUDA graphs (``test_cuda_graphs``' stand-in for the capture), then
runs steps: denoising calls with fresh block inputs, and between them what a loop or a careless caller
does to the cache - new tensors, clones, a grown or a cut cache, writes in place of every kind (through
views, ``index_put_``, ``copy_``, ones that leave the values as they were), keys and values swapped, a
batch cut to one row, a shorter block, moved buffer positions, ``model.double()`` - or to the session
(``new_request``, ``reset``, grad and training mode, ``commit``). Two steps follow each change.

The oracle does not follow fbcompile's policy; it checks what any policy must give. A call fbcompile
does not count as a reuse must equal the plain layer (fp32, 1e-5). A call it counts as a reuse must
equal, by hand, the FlashBlock merge of this call's block part with the external part ``(O_e, L_e)``
of an earlier non-reuse call whose external keys/values held the same values as now (and whose block
had the same shape and dtype): a reuse over a cache that changed since, of any kind, matches no such
call. With the guards blind to writes in place, the machine fails (the last test).
Profiles as ``test_fuzz.py`` (``FBCOMPILE_FUZZ=long``: 200 machines of up to 40 steps).
"""
from __future__ import annotations

import contextlib
import os
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, Phase, event, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule, run_state_machine_as_test

import fbcompile
from attention_zoo import ZooSpec, build, rel_error
from fbcompile.backends import cuda_graphs, dispatcher, provenance
from fbcompile.kernels import reference
from test_cuda_graphs import stand_in_record

LONG = os.environ.get("FBCOMPILE_FUZZ") == "long"
COMPILER = os.environ.get("FBCOMPILE_FUZZ_COMPILER", "eager")
TOL = 1e-5
POLICIES = ["block", "block", 2, "adaptive"]
MIN_ROWS = 4  # a dual cache keeps 3 rows after the block
WRITES = ["mul", "slice", "index_put", "copy", "view", "narrow_zero", "same_values"]


class ReuseMachine(RuleBasedStateMachine):
    """The cache lives in ``self.k`` / ``self.v`` (and the buffer positions in ``self.positions``);
    ``self.seen`` holds the external part of every earlier call that did not reuse."""

    @initialize(form=st.sampled_from(["sdpa", "eager"]), layout=st.sampled_from(["bhsd", "bshd"]),
                cache=st.sampled_from(["cat", "cat_break", "dual", "index_copy", "setitem", "slice", "window"]),
                policy=st.sampled_from(POLICIES), graphs=st.booleans(), seed=st.integers(0, 2**16))
    def build(self, form, layout, cache, policy, graphs, seed):
        torch._dynamo.reset()  # every machine compiles the zoo's forward anew: dynamo's recompile limit
        # CUDA graphs' bookkeeping with test_cuda_graphs' stand-in for the capture (a replay re-runs the graph)
        self.patches = [mock.patch.object(cuda_graphs, "DEVICE_TYPE", "cpu"),
                        mock.patch.object(cuda_graphs, "record", stand_in_record)] if graphs else []
        for patch in self.patches:
            patch.start()
        buffer = cache if cache in ("index_copy", "setitem", "slice", "window") else "none"
        self.spec = s = ZooSpec(form=form, layout=layout, mask="none", buffer=buffer, cache=12, block=6,
                                suffix=3 if cache == "dual" else 0, graph_break=cache == "cat_break",
                                read_start=3 if cache == "window" else 0, tail=2, heads=4, kv_heads=2, head_dim=8)
        self.plain = build(s, seed=seed)
        config = fbcompile.Config(refresh=policy, drift=0.05, compiler=COMPILER, cuda_graphs=graphs)
        self.model = fbcompile.optimize(build(s, seed=seed), config)
        self.gen = torch.Generator().manual_seed(seed)
        self.batch, self.block = 2, s.block
        rows = s.cache + {"none": 0, "window": s.block + s.tail}.get(buffer, s.block)
        self.k, self.v = self._random_cache(rows), self._random_cache(rows)
        start = s.cache - s.suffix
        self.positions = start + torch.randperm(self.block, generator=self.gen) if buffer != "none" else None
        self.seen = []
        self.calls = self.reuses = 0
        note(f"{s} policy={policy} graphs={graphs}")
        self._call()

    # --- the cache ----------------------------------------------------------------------------------

    def _seq(self) -> int:
        return 2 if self.spec.layout == "bhsd" else 1

    def _random_cache(self, rows: int, batch: int | None = None) -> torch.Tensor:
        s = self.spec
        shape = [batch or self.batch, s.kv_heads, rows, s.head_dim]
        if s.layout == "bshd":
            shape[1], shape[2] = shape[2], shape[1]
        return torch.randn(shape, generator=self.gen).to(self.plain.o.weight.dtype)

    def _rows(self) -> int:
        return self.k.shape[self._seq()]

    def _buffer(self) -> bool:
        return self.spec.buffer != "none"

    def _external(self, t: torch.Tensor) -> torch.Tensor:
        """The rows of cache ``t`` the layer reads as cached, heads first: a buffer's rows but the block's, a
        static cache's window up to the block's rows."""
        t = t if self.spec.layout == "bhsd" else t.transpose(1, 2)
        if self.spec.buffer == "window":
            return t[:, :, self.spec.read_start:self.spec.cache]
        if not self._buffer():
            return t
        keep = torch.ones(t.shape[2], dtype=torch.bool)
        keep[self.positions] = False
        return t[:, :, keep]

    # --- changes to the cache, its tensors or the session, each followed by two steps --------------

    def _steps_after_a_change(self):
        """The step right after a change must not reuse what the change made stale; the next may reuse."""
        self._call()
        self._call()

    @rule(which=st.sampled_from(["new", "clone"]))
    def new_tensors(self, which):
        """New cache tensors, of new or of the same values."""
        if which == "new":
            self.k, self.v = self._random_cache(self._rows()), self._random_cache(self._rows())
        else:
            self.k, self.v = self.k.clone(), self.v.clone()
        self._steps_after_a_change()

    @rule(rows=st.integers(1, 4))
    def grow(self, rows):
        """The cache grows by ``torch.cat`` (a buffer by rows after the block's)."""
        seq = self._seq()
        self.k = torch.cat([self.k, self._random_cache(rows, self.k.shape[0])], dim=seq)
        self.v = torch.cat([self.v, self._random_cache(rows, self.v.shape[0])], dim=seq)
        self._steps_after_a_change()

    @rule(rows=st.integers(1, 3))
    def cut(self, rows):
        """The cache cut to its first rows: views of the same storage."""
        keep = max(self._rows() - rows, MIN_ROWS)
        if self._buffer():
            keep = max(keep, int(self.positions.max()) + 1)
        self.k, self.v = self.k.narrow(self._seq(), 0, keep), self.v.narrow(self._seq(), 0, keep)
        self._steps_after_a_change()

    @rule(kind=st.sampled_from(WRITES), keys=st.booleans(), row=st.integers(0, 40))
    def write(self, kind, keys, row):
        """A write in place into the keys or the values, at a cached row where it can be."""
        t = self.k if keys else self.v
        seq, block_rows = self._seq(), set(self.positions.tolist()) if self._buffer() else set()
        cached = [r for r in range(self._rows()) if r not in block_rows]
        r = cached[row % len(cached)]
        index = (slice(None),) * seq + (r,)
        if kind == "mul":
            t.mul_(-1.0)
        elif kind == "slice":
            t[index] = torch.randn(t[index].shape, generator=self.gen).to(t.dtype)
        elif kind == "index_put":
            t.index_put_((torch.tensor([0]),) + (torch.tensor([0]),) * (seq - 1) + (torch.tensor([r]),),
                         torch.tensor(5.0, dtype=t.dtype))
        elif kind == "copy":
            t.copy_(torch.randn(t.shape, generator=self.gen).to(t.dtype))
        elif kind == "view":  # through a chain of views
            t[0].select(seq - 1, r).add_(1.0)
        elif kind == "narrow_zero":
            t.narrow(seq, r, 1).zero_()
        else:  # the same values written back: a reuse stays valid, a refresh is fine too
            t[index] = t[index].clone()
        self._steps_after_a_change()

    @precondition(lambda self: self._buffer())
    @rule()
    def write_block_rows(self):
        """A write at the block's rows of a buffer only: the cached rows keep their values."""
        index = (slice(None),) * self._seq() + (self.positions,)
        self.k[index] = 0.0
        self._steps_after_a_change()

    @rule()
    def swap(self):
        """Keys and values swapped: the same two tensors, each in the other's place."""
        self.k, self.v = self.v, self.k
        self._steps_after_a_change()

    @precondition(lambda self: self.k.shape[0] > 1)
    @rule()
    def first_row_of_the_batch(self):
        """The batch cut to its first row (views)."""
        self.batch, self.k, self.v = 1, self.k[:1], self.v[:1]
        self._steps_after_a_change()

    @precondition(lambda self: not self._buffer())
    @rule(block=st.sampled_from([3, 6]))
    def block_length(self, block):
        """The block changes length over the same cache."""
        self.block = block
        self._steps_after_a_change()

    @precondition(lambda self: self.spec.buffer in ("index_copy", "setitem"))
    @rule(start=st.integers(0, 40))
    def move_positions(self, start):
        """The block written at other rows of the buffer (another permutation, another start)."""
        start = start % (self._rows() - self.block + 1)
        self.positions = start + torch.randperm(self.block, generator=self.gen)
        self._steps_after_a_change()

    @precondition(lambda self: self.k.dtype == torch.float32)
    @rule()
    def to_double(self):
        """The model and its cache in float64 (``model.double()``: the same parameters, another dtype)."""
        self.plain.double(), self.model.double()
        self.k, self.v = self.k.double(), self.v.double()
        self._steps_after_a_change()

    @rule(which=st.sampled_from(["new_request", "reset"]))
    def session(self, which):
        getattr(fbcompile, which)(self.model)
        self._steps_after_a_change()

    # --- calls and the oracle ------------------------------------------------------------------------

    def _inputs(self):
        x = torch.randn(self.k.shape[0], self.block, self.spec.heads * self.spec.head_dim, generator=self.gen)
        x = x.to(self.k.dtype)
        return x, self.k, self.v, None, self.positions if self.spec.buffer != "window" else None

    def _parts(self, x, k, v):
        """The keys/values this call reads as cached (heads first; read before the call: a buffer's rows but
        the block's, which it writes), and its external part ``(O_e, L_e)`` and block part ``(O_i, L_i)``."""
        q, k_block, v_block = self.plain._project(x)
        if self.spec.layout == "bshd":
            k_block, v_block = k_block.transpose(1, 2), v_block.transpose(1, 2)
        scale = self.spec.head_dim ** -0.5
        ext_k, ext_v = self._external(k).clone(), self._external(v).clone()
        external = reference.attention_lse(q, ext_k, ext_v, None, scale)
        block = reference.attention_lse(q, k_block, v_block, None, scale)
        return (ext_k, ext_v), external, block

    def _output(self, out):
        B, _, M, _ = out.shape
        return self.plain.o(out.transpose(1, 2).reshape(B, M, -1))

    def _call(self, context=None, grad=False):
        x, k, v, mask, positions = self._inputs()
        contents, external, block = self._parts(x, k, v)
        with torch.no_grad():
            expected = self.plain(x, k.clone(), v.clone(), mask, positions)
        before = fbcompile.stats(self.model).reuses
        with torch.set_grad_enabled(grad), (context or contextlib.nullcontext)():
            got = self.model(x, k, v, mask, positions)
        stats = fbcompile.stats(self.model)
        reused = stats.reuses > before
        note(f"call {self.calls}: {'reuse' if reused else 'no reuse'}, refreshes {stats.refreshes}, "
             f"{dict(stats.refresh_reasons)}, training {self.model.training}, grad {grad}, k {id(k)} v {id(v)}")
        self.calls, self.reuses = self.calls + 1, self.reuses + reused
        if not reused:
            assert rel_error(got, expected) < TOL, "a call that did not reuse differs from the plain layer"
            self.seen.append((contents, external))  # all: a reuse may take a refresh many calls back
            return
        assert context is None and not grad and not self.model.training, "reused with grad, in training or a commit"
        errors = [rel_error(got, self._output(reference.merge_lse(*o_e, *block)[0]))
                  for (ext_k, ext_v), o_e in self.seen
                  if (o_e[0].shape, o_e[0].dtype, ext_k.shape) == (block[0].shape, block[0].dtype, contents[0].shape)
                  and torch.equal(ext_k, contents[0]) and torch.equal(ext_v, contents[1])]
        assert errors, "reused an external part computed over other keys/values (stale)"
        assert min(errors) < TOL, f"a reuse is not the merge of an external part over these keys/values: {errors}"

    # --- steps -------------------------------------------------------------------------------------

    @rule(calls=st.integers(1, 3))
    def steps(self, calls):
        """A run of denoising steps over the cache as it is."""
        for _ in range(calls):
            self._call()

    @rule()
    def step_with_grad(self):
        self._call(grad=True)

    @rule()
    def step_in_training_mode(self):
        self.model.train()
        try:
            self._call()
        finally:
            self.model.eval()

    @rule()
    def step_committed(self):
        self._call(context=lambda: fbcompile.commit(self.model))

    def teardown(self):
        for patch in getattr(self, "patches", []):
            patch.stop()
        if not hasattr(self, "spec"):
            return
        s = self.spec
        cache = s.buffer if self._buffer() else "dual" if s.suffix else "cat_break" if s.graph_break else "cat"
        event(f"{cache}, reuse calls: {'some' if self.reuses else 'none'}")
        event(f"CUDA graphs (stand-in): {bool(self.patches)}")


SETTINGS = settings(max_examples=200 if LONG else 25, stateful_step_count=40 if LONG else 15, derandomize=not LONG,
                    database=None, deadline=None, print_blob=True,
                    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
ReuseMachine.TestCase.settings = SETTINGS
TestReuseIsNeverStale = ReuseMachine.TestCase


def test_the_oracle_catches_a_runtime_blind_to_writes(monkeypatch):
    """With every ``_version`` read as 0 (writes in place invisible to the guards), the machine finds a
    stale reuse: the oracle can fail."""
    monkeypatch.setattr(provenance, "version", lambda tensor: 0)
    monkeypatch.setattr(dispatcher, "version", lambda tensor: 0)
    monkeypatch.setattr(dispatcher.SplitGraphDispatcher, "_signature",
                        lambda self, args: tuple((id(a), a.shape) if isinstance(a, torch.Tensor) else a
                                                 for a in map(args.__getitem__, self._watched)))
    with pytest.raises(AssertionError, match="stale"):
        run_state_machine_as_test(ReuseMachine, settings=settings(SETTINGS, phases=[Phase.generate]))
