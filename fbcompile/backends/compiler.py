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
from fbcompile.backends.dispatcher import SplitGraphDispatcher
from fbcompile.backends.session import Session
from fbcompile.config import Config
from fbcompile.passes.find_attention import find_attention_sites
from fbcompile.passes.graph_utils import is_parameter
from fbcompile.passes.reuse_external import refresh_graph, reuse_graph
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


def _placeholder_indices(gm: fx.GraphModule, nodes) -> list[int]:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return [placeholders.index(n) for n in nodes]


def compile_graph(session: Session, gm: fx.GraphModule, example_inputs: list):
    """Backend body: analyse and rewrite ``gm``, record it in ``session``, return the callable."""
    config = session.config
    sites = find_attention_sites(gm)
    record = session.new_graph([s.describe() for s in sites], gm.code)
    for site in sites:
        log.info("graph %d: %s %s", record.index, site.node.name, site.decision)
    splittable = [s for s in sites if s.splittable]
    external = list(dict.fromkeys(n for s in splittable for n in s.external_inputs))
    block = list(dict.fromkeys(n for s in splittable for n in _block_inputs(s)))
    if not split_attention(gm, sites):
        return _compile(gm, example_inputs, config)
    record.code_refresh = gm.code
    record.split_graph = gm
    if config.refresh == "always":
        return SplitGraphDispatcher(session, record, _compile(gm, example_inputs, config), None,
                                    len(_outputs(gm)), [], [])
    refresh_gm, num_outputs = refresh_graph(gm)
    reuse_gm, cached_examples = reuse_graph(gm)
    record.code_reuse = reuse_gm.code
    record.reuse_graph = reuse_gm
    return SplitGraphDispatcher(
        session, record,
        refresh=_compile(refresh_gm, example_inputs, config),
        reuse=_compile(reuse_gm, list(example_inputs) + cached_examples, config),
        num_outputs=num_outputs,
        external_inputs=_placeholder_indices(gm, external),
        block_inputs=_placeholder_indices(gm, block + _int_inputs(gm)),
    )


def _outputs(gm: fx.GraphModule) -> tuple:
    return tuple(next(n for n in reversed(gm.graph.nodes) if n.op == "output").args[0])


def _block_inputs(site) -> list[fx.Node]:
    """Non-parameter tensor inputs the query depends on (their shape/dtype/device guard reuse)."""
    nodes, stack = set(), [site.q]
    while stack:
        node = stack.pop()
        if node in nodes:
            continue
        nodes.add(node)
        stack.extend(node.all_input_nodes)
    return [n for n in nodes if n.op == "placeholder" and isinstance(n.meta.get("example_value"), torch.Tensor)
            and not is_parameter(n)]


def _int_inputs(gm: fx.GraphModule) -> list[fx.Node]:
    """Symbolic-int inputs (sizes, offsets): a change of any of them forces a refresh."""
    return [n for n in gm.graph.nodes if n.op == "placeholder" and not isinstance(n.meta.get("example_value"), torch.Tensor)]


def make_backend(session: Session):
    """A backend bound to ``session`` (what ``fbcompile.optimize`` passes to torch.compile)."""
    return functools.partial(compile_graph, session)


def fbcompile_backend(gm: fx.GraphModule, example_inputs: list, options: dict | None = None, **_):
    """Entry point ``backend="fbcompile"``: options are :class:`fbcompile.Config` fields."""
    return compile_graph(shared_session(Config.from_options(options)), gm, example_inputs)
