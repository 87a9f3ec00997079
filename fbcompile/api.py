"""The user-facing verbs: ``optimize``, ``explain``, ``stats``, ``reset``, ``new_request``, ``backend``."""
from __future__ import annotations

import functools

import torch

from fbcompile.backends.compiler import Backend, compile_forward, last_shared_session, session_of_compiled
from fbcompile.backends.session import Session, Stats
from fbcompile.config import Config
from fbcompile.report import Report

_ATTR = "_fbcompile"


def optimize(model: torch.nn.Module, config: Config | None = None) -> torch.nn.Module:
    """Compile ``model.forward`` in place with fbcompile; ``model(...)`` and ``model.generate`` use it.

    The cache length is treated as dynamic (dynamo's automatic dynamic shapes), so the number of
    compiled graphs does not grow with the number of generated blocks. Each optimized model has its
    own compile budget (``Config.recompile_limit``), so many models of one class compile alike.
    ``Config(scope="blocks")`` compiles the model's repeated blocks instead of its forward.
    ``model.generate``, if the model has one, starts a new request at each call
    (:func:`new_request`): no request reuses another's cached external attention.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"fbcompile.optimize expects a torch.nn.Module, got {type(model).__name__}")
    if config is None:
        config = Config()
    if not isinstance(config, Config):
        raise TypeError(f"config must be a fbcompile.Config, got {type(config).__name__}")
    if _session_of(model) is not None:
        raise RuntimeError("model is already optimized by fbcompile; build a new model to change the config")
    blocks = repeated_blocks(model) if config.scope == "blocks" else []
    session = Session(config, module=model)
    model.__dict__[_ATTR] = session
    if blocks:
        forwards = {}  # one compiled function per class: its blocks share the graphs
        for block in blocks:
            if type(block) not in forwards:
                forwards[type(block)] = compile_forward(type(block).forward, session)
            block.forward = functools.partial(forwards[type(block)], block)
    else:
        model.forward = compile_forward(model.forward, session)
    generate = getattr(model, "generate", None)
    if callable(generate):
        model.generate = _starting_requests(generate, session)
    return model


def repeated_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The submodules ``Config(scope="blocks")`` compiles: instances of the classes the model names as
    its repeated blocks (diffusers' ``_repeated_blocks``, else transformers' ``_no_split_modules``)."""
    names = getattr(model, "_repeated_blocks", None) or getattr(model, "_no_split_modules", None) or ()
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise ValueError(f"Config(scope='blocks'): {type(model).__name__} names no repeated block class "
                         "(_repeated_blocks or _no_split_modules) with instances in the model")
    return blocks


def _starting_requests(generate, session: Session):
    @functools.wraps(generate)
    def generate_request(*args, **kwargs):
        session.new_request()
        return generate(*args, **kwargs)

    return generate_request


def backend(mode: str | None = None, **options) -> Backend:
    """A ``torch.compile`` backend with its own state, checked now (``torch.compile(backend="fbcompile",
    options=...)`` is only checked when dynamo compiles the first graph)::

        compiled = torch.compile(model, backend=fbcompile.backend(refresh="always"))

    ``options``: :class:`Config` fields; ``mode``: ``torch.compile``'s (modes with CUDA graphs are refused).
    """
    return Backend(Session(Config.from_options(options), mode=mode))


def commit(model: torch.nn.Module | None = None):
    """Context manager: the calls inside commit the finished block into the cache, so they run exactly.

    Needed where a call cannot show it commits: a loop that appends each denoising step's block to an
    HF ``DynamicCache`` and crops it off again (``cache.crop``) and then appends the finished block
    with the same forward; or a commit whose concatenation reaches the attention across a graph break
    (SDAR's ``store_kv=True`` pass). Graphs that return the block's keys/values run exactly on their
    own otherwise (``Config.exact_save_pass``)::

        with fbcompile.commit(model):
            model(block, past_key_values=cache, use_cache=True)
    """
    return _session(model).commit()


def _session_of(model) -> Session | None:
    for obj in (model, getattr(model, "_orig_mod", None)):
        if obj is not None and _ATTR in getattr(obj, "__dict__", {}):
            return obj.__dict__[_ATTR]
    return None


def _session(model) -> Session:
    if model is None:
        session = last_shared_session()
    else:
        session = _session_of(model) or session_of_compiled(model)
    if session is None:
        what = ("this model was not optimized by fbcompile (nor compiled with backend='fbcompile')"
                if model is not None else "nothing was compiled")
        raise ValueError(f"no fbcompile state: {what}")
    return session


def explain(model: torch.nn.Module | None = None, *args, **kwargs) -> Report:
    """Report of the attention sites fbcompile found and what it did with each.

    ``explain(model)`` after the optimized (or ``torch.compile(backend="fbcompile")``-compiled) model
    ran; ``explain(model, *inputs)`` traces ``model`` on the inputs first (exact mode, no Inductor,
    the model is left as it was); ``explain()`` for the last plain ``torch.compile(..., backend="fbcompile")``.
    """
    if not args and not kwargs:
        return Report(_session(model).graphs)
    session = Session(Config(refresh="always", compiler="eager"))
    forward = getattr(model.forward, "_torchdynamo_orig_callable", model.forward)
    with torch.no_grad():
        compile_forward(forward, session)(*args, **kwargs)
    return Report(session.graphs)


def stats(model: torch.nn.Module | None = None) -> Stats:
    """Compile, refresh and reuse counts (totals and per site) since the last reset."""
    return _session(model).stats()


def reset(model: torch.nn.Module | None = None) -> None:
    """Drop every cached external attention result of ``model`` and zero its counters."""
    _session(model).reset()


def new_request(model: torch.nn.Module | None = None) -> None:
    """Start a new request on ``model``: nothing cached before is reused (counters stay).

    ``model.generate`` of an optimized model does this itself; call it in hand-written loops
    between requests that share a prefix cache (the guards cannot tell such requests apart).
    """
    _session(model).new_request()
