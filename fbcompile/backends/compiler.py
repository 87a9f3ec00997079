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
from fbcompile.backends import cuda_graphs
from fbcompile.backends.cuda_graphs import CapturedGraph, WithHostIsland
from fbcompile.backends.dispatcher import (CompiledGraph, CompiledStep, ExactDispatcher, ProbeDispatcher,
                                           SplitGraphDispatcher)
from fbcompile.backends.inductor_choices import block_step_choices
from fbcompile.backends import kernel_analysis, provenance
from fbcompile.backends.policies import policies_for
from fbcompile.backends.session import GraphRecord, Session, SiteCounters
from fbcompile.config import Config
from fbcompile.passes.attention_kernels import attention_parts, fake_inputs, kernels_of
from fbcompile.passes.cat_outputs import cat_outputs, kv_outputs
from fbcompile.passes.cudnn_merges import merge_calls, split_cudnn_merges
from fbcompile.passes.find_attention import find_attention_sites
from fbcompile.passes.flash_varlen import unpack_flash_varlen
from fbcompile.passes.graph_utils import copy_module, is_module_state, tensor_free
from fbcompile.passes.gated_linears import gated_linears
from fbcompile.passes.group_linears import group_linears
from fbcompile.passes.linear_partials import linear_partials
from fbcompile.passes.residual_linears import residual_linears
from fbcompile.passes.hoist_cache_cats import hoist_cache_cats
from fbcompile.passes.host_island import split_host_island
from fbcompile.passes.key_count import add_key_count
from fbcompile.passes.refresh_attention import fuse_refresh_attention
from fbcompile.passes.reuse_external import SpecializedGraph
from fbcompile.passes.slice_writes import slice_writes
from fbcompile.passes.specialize import specialize
from fbcompile.passes.split_joined_inputs import split_joined_inputs

log = logging.getLogger("fbcompile")
kernel_analysis.install()

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


def _on_cuda(example_inputs: list) -> bool:
    return any(isinstance(x, torch.Tensor) and x.is_cuda for x in example_inputs)


def inductor_options(session: Session, example_inputs: list) -> dict | None:
    """Inductor's config patches for a graph fbcompile compiles: the mode's (:func:`check_mode`) and,
    for a graph on CUDA, combo kernels (:attr:`Config.combo_kernels`) and, where Inductor's config has
    the key (its cache key then tells them apart), the heuristics of :mod:`.inductor_choices`."""
    from torch._inductor import config as inductor_config

    options = check_mode(session.mode)
    if _on_cuda(example_inputs):
        if session.config.combo_kernels:
            options["combo_kernels"] = True
        if hasattr(inductor_config, "inductor_choices_class"):
            options["inductor_choices_class"] = block_step_choices
    return options or None


def _inductor(compile_fx, gm: fx.GraphModule, example_inputs: list, session: Session):
    """``compile_fx`` with :func:`inductor_options`; if it fails with combo kernels (an experimental
    Inductor option), once more without them, so that the graph still runs compiled.

    Under CUDA graphs the fbcompile ops that launch Triton kernels stay opaque to Inductor (it calls
    each op, whose body plans and launches its kernels) instead of being traced into their launches.
    A traced launch plan guards on the query and batch counts: a graph per power-of-two bucket of them
    (Dream's prefix cache compiled 5 graphs on the H100, each twice in block mode: refresh and reuse).
    An opaque op plans at each call, so one graph serves every length, and its host code runs only
    when a CUDA graph is captured, not at the replays. Graphs that run uncaptured pay that host code
    at every call. On CUDA, Inductor's heuristics are those of :mod:`.inductor_choices`."""
    from torch._inductor.virtualized import V

    options = inductor_options(session, example_inputs)
    choices = block_step_choices() if _on_cuda(example_inputs) else V.choices
    with torch._functorch.config.patch(decompose_custom_triton_ops=not session.cuda_graphs), \
            V.set_choices_handler(choices):
        try:
            return compile_fx(gm, example_inputs, config_patches=options)
        except Exception as error:
            if not (options and options.pop("combo_kernels", False)):
                raise
            log.info("Inductor failed with combo kernels (%s: %s); compiling without them", type(error).__name__,
                     error)
            return compile_fx(gm, example_inputs, config_patches=options or None)


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


def _compile(gm: fx.GraphModule, example_inputs: list, session: Session, kv: set[int] = frozenset(),
             record: GraphRecord | None = None, role: str = "graph", kept: tuple[set[int], set[int]] = ((), ())):
    """``gm`` compiled, as a CUDA graph where it can be if the session asks for them (``kv``: argument
    indices of cached keys/values, which a captured graph reads in place, or from buffers with spare
    capacity where the pass :func:`add_key_count` proves the graph may; their concatenations with the
    block, returned, are joined outside the graph: :func:`hoist_cache_cats`). ``record`` notes how the
    graph runs over a cache that moves (:attr:`GraphRecord.cuda_graphs`), which linears it groups
    (:func:`group_linears`), which gated MLPs apply their gate in their GEMM (:func:`gated_linears`), which
    residual adds move into GEMM stores (:func:`residual_linears`), which split reductions their consumers
    sum (:func:`linear_partials`) and
    whether Inductor failed on it, under ``role``. ``kept``: the indices of
    the cached parts the graph takes and of those it returns for the dispatcher to keep."""
    notes = record.cuda_graphs if record is not None else None
    config = session.config
    if config.group_linears or config.gated_linears or config.residual_linears:
        rewritten = copy_module(gm)
        gated = gated_linears(rewritten) if config.gated_linears else []  # first: it takes gate/up pairs
        groups = group_linears(rewritten) if config.group_linears else []
        residuals = residual_linears(rewritten) if config.residual_linears else []
        partials = linear_partials(rewritten) if config.linear_partials else []  # last: it takes their launches
        if groups or gated or residuals or partials:
            gm = rewritten
            log.info("%s: %d groups of linears in one launch each, %d gated linears, %d residual adds in GEMMs, "
                     "%d split reductions summed by their consumers", role, len(groups), len(gated), len(residuals),
                     len(partials))
        if record is not None and groups:
            record.linear_groups[role] = groups
        if record is not None and gated:
            record.gated_linears[role] = gated
        if record is not None and residuals:
            record.residual_linears[role] = residuals
        if record is not None and partials:
            record.linear_partials[role] = partials
    island = None
    if session.cuda_graphs and not kv and not any(kept) and (host := _host_inputs(example_inputs)):
        rewritten = copy_module(gm)  # a copy: dynamo reads gm's placeholders after the backend returns
        island = split_host_island(rewritten, host)
        if island is not None:
            gm = rewritten
            if notes is not None:
                notes[role] = f"{len(island.outputs)} output(s) computed from host inputs before the replay"
    joins, key_count, on_cudnn = [], None, None
    if session.cuda_graphs and kv:  # a copy: dynamo reads gm's placeholders after the backend returns
        captured = copy_module(gm)
        joins = hoist_cache_cats(captured, kv)
        on_cudnn = _on_cudnn(captured, example_inputs)  # copies keep node names: the merges below read it too
        key_count, why_not = add_key_count(captured, kv, on_cudnn)
        if key_count is not None:
            cached = next(p for p in key_count.padded if isinstance(p.extra, int))  # (not a dynamic block's)
            first = example_inputs[cached.index]
            length = cached.length(first)
            example_inputs = [*example_inputs, torch.full((1,), length, dtype=torch.int32, device=first.device)]
        elif why_not is not None:
            log.info("no spare capacity for the cached keys/values: %s", why_not)
        if joins or key_count is not None:
            gm = captured
        if notes is not None:
            notes[role] = _capture_note(key_count, why_not, joins)
    if session.cuda_graphs and config.compiler != "eager" and merge_calls(gm):
        on_cudnn = _on_cudnn(gm, example_inputs) if on_cudnn is None else on_cudnn
        if on_cudnn and (merges := split_cudnn_merges(rewritten := copy_module(gm), on_cudnn)):
            gm = rewritten
            log.info("%s: %d merge(s) of cuDNN's internal parts left to Inductor", role, len(merges))
    if config.joint_attention and merge_calls(gm) and (fused := fuse_refresh_attention(refreshed := copy_module(gm))):
        gm = refreshed
        log.info("%s: %d split attention(s) with both parts in one op", role, len(fused))
        if record is not None:
            record.joint_attention[role] = fused
    if record is not None and attention_parts(gm):
        record.attention_graphs[role] = (gm, *fake_inputs(example_inputs))
    if session.config.compiler == "eager":
        run = gm.forward
    else:
        from torch._inductor import compile_fx

        try:
            run = _inductor(compile_fx.compile_fx, gm, example_inputs, session)
        except Exception as error:  # an Inductor bug on a correct graph: run the graph as it is
            why = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            warnings.warn(f"fbcompile: Inductor could not compile a graph ({why}); it runs without Inductor "
                          "(Config(compiler='eager') avoids this warning)", stacklevel=2)
            if record is not None:
                record.uncompiled[role] = why
            run = gm.forward
    if not session.cuda_graphs:
        return run
    if tensor_free(gm):  # nothing to capture: a replay of an empty CUDA graph would only cost host time
        if notes is not None:
            notes[role] = "no tensor ops (ints from sizes, or all moved out): runs as it is, not captured"
        return run if island is None else WithHostIsland(island, run)
    captured = CapturedGraph(run, gm, session, kv, key_count, joins, kept_inputs=set(kept[0]),
                             kept_outputs=set(kept[1]))
    return captured if island is None else WithHostIsland(island, captured)


def _host_inputs(example_inputs: list) -> set[int]:
    """Indices of the CPU tensor inputs (Wan's ``grid_sizes``) if others are on the CUDA graphs' device."""
    devices = [x.device.type if isinstance(x, torch.Tensor) else None for x in example_inputs]
    if cuda_graphs.DEVICE_TYPE not in devices:
        return set()
    return {i for i, device in enumerate(devices) if device == "cpu"}


def _on_cudnn(gm: fx.GraphModule, example_inputs: list) -> frozenset[str]:
    """Names of the attention calls of ``gm`` that run on cuDNN (only CUDA inputs can: elsewhere the
    graph is not run on fake inputs to find out)."""
    if not any(isinstance(x, torch.Tensor) and x.is_cuda for x in example_inputs):
        return frozenset()
    try:
        kernels = kernels_of(gm, *fake_inputs(example_inputs))
    except Exception as error:  # a key count then at worst moves a cuDNN part to the Triton kernel
        log.info("could not tell which attention parts run on cuDNN: %s", error)
        return frozenset()
    return frozenset(name for name, kernel in kernels.items() if kernel == "cuDNN")


def _capture_note(key_count, why_not: str | None, joins: list) -> str:
    """How a captured graph runs over cached keys/values that are new tensors (``explain`` shows it)."""
    if key_count is not None:
        masks = sum(1 for p in key_count.padded if p.extra != 0 and not p.joined)
        cached = any(not p.unread and p.cached_read and (p.joined or p.extra == 0) for p in key_count.padded)
        block_only = any(p.joined and not p.cached_read for p in key_count.padded)
        positions = key_count.positions
        parts = [what for what, n in (("the cache copied into buffers", cached),
                                      ("the block's keys/values copied after the capacity", block_only),
                                      (f"{masks} mask(s) over cache and block copied into buffers", masks),
                                      (f"{positions} position computation(s) from it", positions),
                                      (f"{key_count.tables} position-table read(s) at it", key_count.tables),
                                      (f"{key_count.masks} mask(s) built in the graph, " + (
                                          "their positions from the count" if key_count.masks_from_count else
                                          "proved the same at the capacity"), key_count.masks)) if n]
        note = "spare capacity: the cached length read on the device" + (f" ({'; '.join(parts)})" if parts else "")
    elif why_not is not None:
        note = f"uncaptured over each new cache: {why_not}"
    else:
        note = "does not read a cache of changing length"
    return note + (f"; {len(joins)} cat(cache, block) output(s) joined outside the graph" if joins else "")


def _compiled(graph: SpecializedGraph, example_inputs: list, session: Session, kv: set[int],
              record: GraphRecord | None = None, role: str = "graph") -> CompiledGraph:
    cached = range(len(example_inputs), len(example_inputs) + len(graph.cached_examples))
    run = _compile(graph.gm, list(example_inputs) + list(graph.cached_examples), session, kv, record, role,
                   kept=(set(cached), graph.outputs.kept))
    return CompiledGraph(run, graph.outputs, graph.cached_inputs)


def _sites(gm: fx.GraphModule, example_inputs: list) -> list:
    """The attention sites of ``gm``, with inputs an earlier graph joined from cache and block (known
    from their provenance, example inputs being the real tensors) split where they were joined, and
    flash-attn's varlen calls over equal lengths unpacked (:mod:`~fbcompile.passes.flash_varlen`)."""
    unpack_flash_varlen(gm)
    hints = {i: hint for i, value in enumerate(example_inputs) if (hint := provenance.split_hint(value))}
    joined = split_joined_inputs(gm, hints) if hints else []
    sites = find_attention_sites(gm)
    taken = {layout.cat for s in sites if s.splittable for layout in (s.k_layout, s.v_layout)}
    unused = [j for j in joined if j.cat not in taken]
    for j in unused:
        j.undo()
    return find_attention_sites(gm) if unused else sites


def compile_graph(session: Session, gm: fx.GraphModule, example_inputs: list):
    """Backend body: analyse and rewrite ``gm``, record it in ``session``, return the callable
    (which records the provenance of the graph's ``cat`` and keys/values outputs, and logs its slice
    writes of inputs, see :mod:`.provenance`)."""
    cats, returned, writes = cat_outputs(gm), kv_outputs(gm), slice_writes(gm)
    run = _compile_graph(session, gm, example_inputs, returns_cat=bool(cats))
    # the graph's own entries keep the versions of the inputs they cache after each call: no log needed
    guarded = {i for g in run.guards for i in g.external} if isinstance(run, SplitGraphDispatcher) else set()
    return provenance.recording(run, cats, returned, [w for w in writes if w.input not in guarded])


def _reads_cut_caches(sites: list, gm: fx.GraphModule, example_inputs: list) -> bool:
    """Are the cached keys/values of the split sites, in the call being compiled, cut from keys/values an
    earlier call returned (Fast-dLLM's LLaDA: ``k[:, :, :s]`` of the block's full pass)? Then a graph that
    returns the block's keys/values may be a denoising step whose result the loop drops."""
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    cached = [placeholders.index(n) for s in sites if s.splittable for n in s.external_inputs if not is_module_state(n)]
    return bool(cached) and all(isinstance(example_inputs[i], torch.Tensor)
                                and provenance.cut_of_returned(example_inputs[i]) for i in cached)


AUTOGRAD = "autograd on (training, or called without torch.no_grad()): the graph compiled as it is"


def _compile_graph(session: Session, gm: fx.GraphModule, example_inputs: list, returns_cat: bool):
    config = session.config
    code_before = gm.code
    if torch.is_grad_enabled():
        return _compile_for_autograd(session, gm, example_inputs)
    sites = _sites(gm, example_inputs)
    record = session.new_graph([s.describe() for s in sites], code_before)
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    kv = {placeholders.index(n) for s in sites for n in s.external_inputs}
    for site in sites:
        log.info("graph %d: %s %s", record.index, site.node.name, site.decision)
    exact = config.refresh == "always"
    policies = [] if exact else policies_for(config)
    commit_per_call = returns_cat or _reads_cut_caches(sites, gm, example_inputs)
    plan = specialize(gm, sites, exact=exact, exact_save_pass=config.exact_save_pass, commit_per_call=commit_per_call,
                      with_query=any(p.with_query for p in policies), probe=session.observer is not None,
                      reuse_plan=config.reuse_plan, sparse=config.sparse)
    if plan is None:
        return _compile(gm, example_inputs, session, record=record)
    record.code_refresh, record.split_graph, record.no_reuse = gm.code, gm, plan.no_reuse
    record.commits = plan.commits and plan.no_reuse is None
    if any(reason is None for reason in plan.sparse):  # show where the tiles are scored and selected
        record.code_refresh = plan.refresh.gm.code
    record.split_sites = [SiteCounters(node=s.node.name, kv_heads=h.kv)
                          for s, h in zip([s for s in sites if s.splittable], plan.heads)]
    split_rows = [row for s, row in zip(sites, record.sites) if s.splittable]
    for row, reason in zip(split_rows, plan.sparse):
        row["sparse"] = f"{config.sparse}" if reason is None else f"block reuse: {reason}"
    if plan.no_reuse is not None:
        log.info("graph %d: no reuse (%s)", record.index, plan.no_reuse)
        return ExactDispatcher(session, record, _compile(plan.refresh.gm, example_inputs, session, kv,
                                                         record, "exact"), plan.no_reuse)
    steps, compiled = [], {}
    for step in plan.reuse:
        if id(step) not in compiled:
            graph = None
            if step.graph is not None:
                graph = _compiled(step.graph, example_inputs, session, kv, record,
                                  f"reuse, steps {', '.join(map(str, step.steps))}" if config.reuse_plan else "reuse")
                if config.reuse_plan is not None:
                    record.plan_graphs[f"reuse, steps {', '.join(map(str, step.steps))}"] = step.graph.gm
                if record.reuse_graph is None:
                    record.code_reuse, record.reuse_graph = step.graph.gm.code, step.graph.gm
            compiled[id(step)] = CompiledStep(graph, step.recompute, step.kv_read if any(step.kv_read) else None)
        steps.append(compiled[id(step)])
    dispatcher = ProbeDispatcher if session.observer is not None else SplitGraphDispatcher
    return dispatcher(session, record, plan.guards, _compiled(plan.refresh, example_inputs, session, kv,
                                                              record, "refresh"), steps,
                      policies, [h.kv for h in plan.heads], commits=plan.commits)


def _compile_for_autograd(session: Session, gm: fx.GraphModule, example_inputs: list):
    """A graph dynamo traced with autograd on, which it only calls with autograd on (it guards on the
    grad mode): nothing is reused there, and a backward may follow, which fbcompile's ops do not have.
    So no pass touches it: Inductor compiles it as ``torch.compile`` would, and the report shows its
    attention sites as skipped, with :data:`AUTOGRAD` as the reason."""
    sites = find_attention_sites(gm)
    for site in sites:
        site.reason = site.reason or AUTOGRAD
    record = session.new_graph([s.describe() for s in sites], gm.code)
    record.no_reuse = AUTOGRAD
    log.info("graph %d: %s", record.index, AUTOGRAD)
    if session.config.compiler == "eager":
        return gm.forward
    from torch._inductor import compile_fx

    return compile_fx.compile_fx(gm, example_inputs, config_patches=check_mode(session.mode) or None)


RECOMPILES_PER_LAYER = 8  # dynamo's own default budget per frame


def recompile_budget(limit: int, module) -> int:
    """``limit`` plus :data:`RECOMPILES_PER_LAYER` per layer of ``module`` (its longest ``ModuleList``).

    Dynamo counts graphs per code object. A graph break inside a layer (SDAR-style remote code) leaves
    the rest of the layer's code as frames of their own, which dynamo specialises per layer (on its
    ``layer_idx``): their graphs grow with the depth, and a fixed budget would send the deep layers of
    a deep model to eager."""
    layers = max((len(m) for m in module.modules() if isinstance(m, torch.nn.ModuleList)), default=0) \
        if isinstance(module, torch.nn.Module) else 0
    return limit + RECOMPILES_PER_LAYER * layers


def compile_forward(forward, session: Session):
    """``torch.compile(forward)`` into ``session``, with its own recompile budget
    (:func:`recompile_budget` of ``Config.recompile_limit``) where torch has per-call budgets (2.13
    and later)."""
    budget = {}
    if "isolate_recompiles" in inspect.signature(torch.compile).parameters:
        limit = recompile_budget(session.config.recompile_limit, getattr(forward, "__self__", None))
        budget = dict(recompile_limit=limit, isolate_recompiles=True)
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
                              "fbcompile.Config(recompile_limit=...) or find the cause with TORCH_LOGS=recompiles; "
                              "if it is an argument that changes at every call, such as a growing list, compile "
                              "the model's blocks instead: fbcompile.Config(scope='blocks').",
                              stacklevel=2)
        return True


recompile_limit_warning = RecompileLimitWarning()
