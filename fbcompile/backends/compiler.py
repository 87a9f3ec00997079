"""The ``fbcompile`` torch.compile backend: find, split and specialise attention, then compile.

Registered as the ``torch_dynamo_backends`` entry point ``fbcompile``, so that
``torch.compile(model, backend="fbcompile", options={"refresh": "always"})`` works after install.
"""
from __future__ import annotations

import functools
import logging

import torch
import torch.fx as fx

import fbcompile.ops  # noqa: F401  (registers torch.ops.fbcompile.*)
from fbcompile.backends.dispatcher import SiteGuard, SplitGraphDispatcher, StepGraph
from fbcompile.backends.session import Session
from fbcompile.config import Config, ReusePlan
from fbcompile.passes.find_attention import find_attention_sites
from fbcompile.passes.graph_utils import VIEW_OPS, is_parameter, op_name, same_size
from fbcompile.passes.reuse_external import (external_results, probe_graph, refresh_graph, reuse_graph,
                                             site_heads)
from fbcompile.passes.split_attention import split_attention

log = logging.getLogger("fbcompile")

_shared_sessions: dict[Config, Session] = {}


def shared_session(config: Config | None = None) -> Session:
    """The session of plain ``torch.compile(..., backend="fbcompile")`` calls, one per Config.

    The most recently used one is kept last, so ``fbcompile.stats()`` can find it.
    """
    config = config or Config()
    session = _shared_sessions.pop(config, None) or Session(config)
    _shared_sessions[config] = session
    return session


def last_shared_session() -> Session | None:
    return next(reversed(_shared_sessions.values()), None)


def _compile(gm: fx.GraphModule, example_inputs: list, config: Config):
    if config.compiler == "eager":
        return gm.forward
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs)


def compile_graph(session: Session, gm: fx.GraphModule, example_inputs: list):
    """Backend body: analyse and rewrite ``gm``, record it in ``session``, return the callable."""
    config = session.config
    sites = find_attention_sites(gm)
    record = session.new_graph([s.describe() for s in sites], gm.code)
    for site in sites:
        log.info("graph %d: %s %s", record.index, site.node.name, site.decision)
    external = [(s.external_inputs, s.cache_offsets(), _block_input(s), s.position_tensors())
                for s in sites if s.splittable]
    saves_block = config.exact_save_pass and _returns_block_kv(gm, sites)
    if not split_attention(gm, sites):
        return _compile(gm, example_inputs, config)
    record.code_refresh, record.split_graph = gm.code, gm
    heads = site_heads(gm.graph)
    kv_heads = [h.kv for h in heads]
    guards = None if config.refresh == "always" or saves_block else _site_guards(gm, external)
    if guards is None:
        reason = ("exact mode" if config.refresh == "always" else "save pass" if saves_block
                  else "query size not guardable")
        log.info("graph %d: no reuse (%s)", record.index, reason)
        return SplitGraphDispatcher(session, record, _compile(gm, example_inputs, config), None,
                                    len(_outputs(gm)), [], kv_heads=kv_heads, exact_reason=reason)
    if config.reuse_plan is not None:
        _check_plan(config.reuse_plan, heads)
    if session.observer is not None:
        probe_gm, num_outputs = probe_graph(gm)
        return SplitGraphDispatcher(session, record, _compile(probe_gm, example_inputs, config), None,
                                    num_outputs, guards, kv_heads=kv_heads, probe=True,
                                    plan_steps=_plan_steps(config, gm, heads, None))
    adaptive = config.refresh == "adaptive"
    refresh_gm, num_outputs = refresh_graph(gm, with_query=adaptive)
    reuse = plan_steps = None
    if config.reuse_plan is None:
        reuse_gm, cached_examples, _ = reuse_graph(gm, with_query=adaptive)
        record.code_reuse, record.reuse_graph = reuse_gm.code, reuse_gm
        reuse = _compile(reuse_gm, list(example_inputs) + cached_examples, config)
    else:
        plan_steps = _plan_steps(config, gm, heads, (record, example_inputs))
    return SplitGraphDispatcher(
        session, record,
        refresh=_compile(refresh_gm, example_inputs, config), reuse=reuse,
        num_outputs=num_outputs, sites=guards, kv_heads=kv_heads, plan_steps=plan_steps,
    )


def _check_plan(plan: ReusePlan, heads: list) -> None:
    if plan.sites != len(heads):
        raise ValueError(f"Config.reuse_plan covers {plan.sites} attention site(s), but this graph has "
                         f"{len(heads)}; calibrate on the same model and inputs")
    for i, h in enumerate(heads):
        if plan.heads(i) != h.query:
            raise ValueError(f"Config.reuse_plan lists {plan.heads(i)} heads for site {i}, which has {h.query}")


def _plan_steps(config: Config, gm: fx.GraphModule, heads: list, compile_for) -> list[StepGraph] | None:
    """One :class:`StepGraph` per step of the reuse plan; steps that recompute the same KV heads
    share a graph. ``compile_for``: ``(record, example inputs)``, or None to only list what each
    step recomputes (probe mode simulates it)."""
    plan = config.reuse_plan
    if plan is None:
        return None
    steps_of: dict[tuple, list[int]] = {}  # KV-head ranges per site -> the steps that read them
    for step in range(1, plan.steps + 1):
        ranges = tuple(tuple(plan.recompute(i, step, h.kv)) for i, h in enumerate(heads))
        steps_of.setdefault(ranges, []).append(step)
    by_step = {}
    for ranges, steps in steps_of.items():
        run, updated = None, [i for i, r in enumerate(ranges) if r]
        if compile_for is not None:
            record, example_inputs = compile_for
            step_gm, cached_examples, updated = reuse_graph(gm, with_query=config.refresh == "adaptive",
                                                            recompute=[list(r) for r in ranges])
            record.plan_graphs[f"reuse, steps {', '.join(map(str, steps))}"] = step_gm
            if record.reuse_graph is None:
                record.code_reuse, record.reuse_graph = step_gm.code, step_gm
            run = _compile(step_gm, list(example_inputs) + cached_examples, config)
        graph = StepGraph(run=run, updated=updated,
                          recompute=[[(a * h.query // h.kv, b * h.query // h.kv) for a, b in r]
                                     for r, h in zip(ranges, heads)],
                          units=sum(b - a for r in ranges for a, b in r))
        by_step.update(dict.fromkeys(steps, graph))
    return [by_step[step] for step in range(1, plan.steps + 1)]


def _returns_block_kv(gm: fx.GraphModule, sites) -> bool:
    """Does the graph return (a view of) some split site's block keys/values, i.e. commit the block?"""
    outputs = set()
    for value in _outputs(gm):
        node = value
        while isinstance(node, fx.Node):
            outputs.add(node)
            node = node.args[0] if op_name(node) in VIEW_OPS and node.args else None
    return any(isinstance(layout.pieces[i], fx.Node) and layout.pieces[i] in outputs
               for site in sites if site.splittable for layout in (site.k_layout, site.v_layout) for i in site.internal)


def _outputs(gm: fx.GraphModule) -> tuple:
    return tuple(next(n for n in reversed(gm.graph.nodes) if n.op == "output").args[0])


def _size_source(size, placeholders: list[fx.Node]):
    """``size`` as an int, or the (argument index, dim) that holds it at run time (dim None: an int arg)."""
    if isinstance(size, int):
        return size
    for index, node in enumerate(placeholders):
        value = node.meta.get("example_value")
        if isinstance(value, torch.Tensor):
            for dim, s in enumerate(value.shape):
                if same_size(s, size):
                    return (index, dim)
        elif isinstance(value, torch.SymInt) and same_size(value, size):
            return (index, None)
    return None


def _site_guards(gm: fx.GraphModule, external: list[tuple]) -> list[SiteGuard] | None:
    """One guard per split site (graph order); None if a query size cannot be read off the inputs."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    guards, seen = [], []
    for (out, _), (inputs, offsets, block, positions) in zip(external_results(gm.graph), external):
        value = out.meta["example_value"]
        shape = [_size_source(s, placeholders) for s in value.shape]
        if any(s is None for s in shape):
            return None
        indices = [placeholders.index(n) for n in inputs]
        guards.append(SiteGuard(external=indices, occurrence=seen.count(indices), out_shape=shape,
                                dtype=value.dtype, device=value.device,
                                offsets=[o if isinstance(o, int) else (placeholders.index(o), None) for o in offsets],
                                block_input=placeholders.index(block) if block is not None else None,
                                positions=[placeholders.index(n) for n in positions]))
        seen.append(indices)
    return guards


def _block_input(site) -> fx.Node | None:
    """The block's input the query is computed from: token ids if there are, else the first tensor."""
    seen, stack, found = set(), [site.q], []
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op == "placeholder":
            value = node.meta.get("example_value")
            if isinstance(value, torch.Tensor) and value.dim() >= 2 and not is_parameter(node):
                found.append(node)
        stack.extend(node.all_input_nodes)
    order = {n: i for i, n in enumerate(site.q.graph.nodes)}
    found.sort(key=lambda n: (n.meta["example_value"].is_floating_point(), order[n]))
    return found[0] if found else None


def make_backend(session: Session):
    """A backend bound to ``session`` (what ``fbcompile.optimize`` passes to torch.compile)."""
    return functools.partial(compile_graph, session)


def fbcompile_backend(gm: fx.GraphModule, example_inputs: list, options: dict | None = None, **_):
    """Entry point ``backend="fbcompile"``: options are :class:`fbcompile.Config` fields."""
    return compile_graph(shared_session(Config.from_options(options)), gm, example_inputs)
