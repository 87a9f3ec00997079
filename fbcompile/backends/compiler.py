"""The ``fbcompile`` torch.compile backend: specialise the graph (passes), compile, dispatch.

Registered as the ``torch_dynamo_backends`` entry point ``fbcompile``, so that
``torch.compile(model, backend="fbcompile", options={"refresh": "always"})`` works after install.
``mode="reduce-overhead"`` (or ``Config(cuda_graphs=True)``) runs the compiled graphs as CUDA graphs,
captured by fbcompile (:mod:`.cuda_graphs`), not by Inductor's cudagraph trees.
Dynamo hands a named backend its ``options`` only when it compiles the first graph; for an error at
``torch.compile`` time build the backend first: ``torch.compile(model, backend=fbcompile.backend(...))``.
"""
from __future__ import annotations

import inspect
import logging
import warnings

import torch
import torch.fx as fx

import fbcompile.ops  # noqa: F401  (registers torch.ops.fbcompile.*)
from fbcompile.backends.cuda_graphs import CapturedGraph
from fbcompile.backends.dispatcher import (CompiledGraph, CompiledStep, ExactDispatcher, ProbeDispatcher,
                                           SplitGraphDispatcher)
from fbcompile.backends.policies import policies_for
from fbcompile.backends.session import Session, SiteCounters
from fbcompile.config import Config
from fbcompile.passes.find_attention import find_attention_sites
from fbcompile.passes.reuse_external import SpecializedGraph
from fbcompile.passes.specialize import specialize

log = logging.getLogger("fbcompile")

_shared_sessions: dict[tuple, Session] = {}


def check_mode(mode: str | None) -> dict:
    """Inductor options of ``torch.compile``'s ``mode``, without Inductor's CUDA graphs: fbcompile captures
    its graphs itself (:mod:`.cuda_graphs`) when the mode asks for them (:attr:`Session.cuda_graphs`)."""
    if mode in (None, "default"):
        return {}
    from torch._inductor import list_mode_options

    options = dict(list_mode_options(mode))
    options.pop("triton.cudagraphs", None)
    return options


def shared_session(config: Config | None = None, mode: str | None = None) -> Session:
    """The session of plain ``torch.compile(..., backend="fbcompile")`` calls, one per Config and mode.

    The most recently used one is kept last, so ``fbcompile.stats()`` can find it.
    """
    key = (config or Config(), mode)
    session = _shared_sessions.pop(key, None) or Session(key[0], mode=mode)
    _shared_sessions[key] = session
    return session


def last_shared_session() -> Session | None:
    return next(reversed(_shared_sessions.values()), None)


def _compile(gm: fx.GraphModule, example_inputs: list, session: Session, kv: set[int] = frozenset()):
    """``gm`` compiled, as a CUDA graph where it can be if the session asks for them (``kv``: argument
    indices of cached keys/values, which a captured graph reads in place)."""
    if session.config.compiler == "eager":
        run = gm.forward
    else:
        from torch._inductor.compile_fx import compile_fx

        run = compile_fx(gm, example_inputs, config_patches=check_mode(session.mode) or None)
    return CapturedGraph(run, gm, session, kv) if session.cuda_graphs else run


def _compiled(graph: SpecializedGraph, example_inputs: list, session: Session, kv: set[int]) -> CompiledGraph:
    run = _compile(graph.gm, list(example_inputs) + list(graph.cached_examples), session, kv)
    return CompiledGraph(run, graph.outputs, graph.cached_inputs)


def compile_graph(session: Session, gm: fx.GraphModule, example_inputs: list):
    """Backend body: analyse and rewrite ``gm``, record it in ``session``, return the callable."""
    config = session.config
    sites = find_attention_sites(gm)
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    kv = {placeholders.index(n) for s in sites for n in s.external_inputs}
    record = session.new_graph([s.describe() for s in sites], gm.code)
    for site in sites:
        log.info("graph %d: %s %s", record.index, site.node.name, site.decision)
    exact = config.refresh == "always"
    policies = [] if exact else policies_for(config)
    plan = specialize(gm, sites, exact=exact, exact_save_pass=config.exact_save_pass,
                      with_query=any(p.with_query for p in policies), probe=session.observer is not None,
                      reuse_plan=config.reuse_plan)
    if plan is None:
        return _compile(gm, example_inputs, session)
    record.code_refresh, record.split_graph, record.no_reuse = gm.code, gm, plan.no_reuse
    record.split_sites = [SiteCounters(node=s.node.name, kv_heads=h.kv)
                          for s, h in zip([s for s in sites if s.splittable], plan.heads)]
    if plan.no_reuse is not None:
        log.info("graph %d: no reuse (%s)", record.index, plan.no_reuse)
        return ExactDispatcher(session, record, _compile(plan.refresh.gm, example_inputs, session, kv), plan.no_reuse)
    steps, compiled = [], {}
    for step in plan.reuse:
        if id(step) not in compiled:
            graph = None
            if step.graph is not None:
                graph = _compiled(step.graph, example_inputs, session, kv)
                if config.reuse_plan is not None:
                    record.plan_graphs[f"reuse, steps {', '.join(map(str, step.steps))}"] = step.graph.gm
                if record.reuse_graph is None:
                    record.code_reuse, record.reuse_graph = step.graph.gm.code, step.graph.gm
            compiled[id(step)] = CompiledStep(graph, step.recompute, step.kv_read if any(step.kv_read) else None)
        steps.append(compiled[id(step)])
    dispatcher = ProbeDispatcher if session.observer is not None else SplitGraphDispatcher
    return dispatcher(session, record, plan.guards, _compiled(plan.refresh, example_inputs, session, kv), steps,
                      policies, [h.kv for h in plan.heads])


def compile_forward(forward, session: Session):
    """``torch.compile(forward)`` into ``session``, with its own recompile budget
    (``Config.recompile_limit``) where torch has per-call budgets (2.13 and later)."""
    budget = {}
    if "isolate_recompiles" in inspect.signature(torch.compile).parameters:
        budget = dict(recompile_limit=session.config.recompile_limit, isolate_recompiles=True)
    recompile_limit_warning.watch(getattr(forward, "__func__", forward))
    return torch.compile(forward, backend=Backend(session), dynamic=None, **budget)


class Backend:
    """A torch.compile backend bound to one :class:`Session`, its options checked when it is built."""

    def __init__(self, session: Session):
        check_mode(session.mode)
        self.session = session

    def __call__(self, gm: fx.GraphModule, example_inputs: list, **torch_compile_args):
        if torch_compile_args:  # torch.compile(..., mode=/options=) next to a backend object
            raise ValueError(f"pass {sorted(torch_compile_args)} to fbcompile.backend(...), not to torch.compile")
        return compile_graph(self.session, gm, example_inputs)


def make_backend(session: Session) -> Backend:
    """A backend bound to ``session`` (what ``fbcompile.optimize`` passes to torch.compile)."""
    return Backend(session)


def fbcompile_backend(gm: fx.GraphModule, example_inputs: list, options: dict | None = None,
                      mode: str | None = None, **unknown):
    """Entry point ``backend="fbcompile"``: options are :class:`fbcompile.Config` fields."""
    if unknown:
        raise TypeError(f"fbcompile backend: unexpected torch.compile argument(s) {sorted(unknown)}")
    check_mode(mode)
    return compile_graph(shared_session(Config.from_options(options), mode), gm, example_inputs)


def session_of_compiled(compiled) -> Session | None:
    """The session a ``torch.compile(...)`` result compiles into, if its backend is fbcompile's."""
    ctx = getattr(compiled, "dynamo_ctx", None)  # an OptimizedModule
    backend = getattr(ctx, "callback", None)
    while backend is not None and not hasattr(backend, "compiler_fn"):  # down to torch.compile's wrapper
        backend = getattr(backend, "_torchdynamo_orig_backend", None)
    if backend is None:
        return None
    if isinstance(backend.compiler_fn, Backend):
        return backend.compiler_fn.session
    if backend.compiler_fn is fbcompile_backend:
        kwargs = backend.kwargs
        return _shared_sessions.get((Config.from_options(kwargs.get("options")), kwargs.get("mode")))
    return None


class RecompileLimitWarning(logging.Filter):
    """Turns dynamo's recompile-limit message about a forward fbcompile optimized into a warning that
    names fbcompile and the fix (dynamo runs that forward uncompiled from then on)."""

    def __init__(self):
        super().__init__()
        self.functions: set[tuple] = set()  # (name, file, first line) of optimized forwards

    def watch(self, fn) -> None:
        code = getattr(fn, "__code__", None)
        if code is not None:
            self.functions.add((code.co_name, code.co_filename, code.co_firstlineno))
            logger = logging.getLogger("torch._dynamo.convert_frame")
            if self not in logger.filters:
                logger.addFilter(self)

    def filter(self, record: logging.LogRecord) -> bool:
        if str(record.msg).startswith("torch._dynamo hit config.") and len(record.args or ()) >= 3:
            limit, value, function = record.args[:3]  # dynamo's message: limit name, its value, the function
            if any(f"'{name}' ({file}:{line})" == function for name, file, line in self.functions):
                warnings.warn(f"fbcompile: dynamo's {limit} ({value}) was reached for "
                              f"{function}, an fbcompile-optimized forward; its calls with new shapes or "
                              "dtypes now run uncompiled (eager), without fbcompile. Raise "
                              "fbcompile.Config(recompile_limit=...) or find the cause with TORCH_LOGS=recompiles.",
                              stacklevel=2)
        return True


recompile_limit_warning = RecompileLimitWarning()
