"""The user-facing verbs: ``optimize``, ``explain``, ``stats``, ``reset``."""
from __future__ import annotations

import torch

from fbcompile.backends.compiler import last_shared_session, make_backend
from fbcompile.backends.session import Session, Stats
from fbcompile.config import Config
from fbcompile.report import Report

_ATTR = "_fbcompile"


def optimize(model: torch.nn.Module, config: Config | None = None) -> torch.nn.Module:
    """Compile ``model.forward`` in place with fbcompile; ``model(...)`` and ``model.generate`` use it.

    The cache length is treated as dynamic (dynamo's automatic dynamic shapes), so the number of
    compiled graphs does not grow with the number of generated blocks.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"fbcompile.optimize expects a torch.nn.Module, got {type(model).__name__}")
    if config is None:
        config = Config()
    if not isinstance(config, Config):
        raise TypeError(f"config must be a fbcompile.Config, got {type(config).__name__}")
    if _session_of(model) is not None:
        raise RuntimeError("model is already optimized by fbcompile; build a new model to change the config")
    session = Session(config, module=model)
    model.__dict__[_ATTR] = session
    model.forward = torch.compile(model.forward, backend=make_backend(session), dynamic=None)
    return model


def _session_of(model) -> Session | None:
    for obj in (model, getattr(model, "_orig_mod", None)):
        if obj is not None and _ATTR in getattr(obj, "__dict__", {}):
            return obj.__dict__[_ATTR]
    return None


def _session(model) -> Session:
    session = _session_of(model) if model is not None else last_shared_session()
    if session is None:
        what = "this model was not optimized by fbcompile" if model is not None else "nothing was compiled"
        raise ValueError(f"no fbcompile state: {what}")
    return session


def explain(model: torch.nn.Module | None = None, *args, **kwargs) -> Report:
    """Report of the attention sites fbcompile found and what it did with each.

    ``explain(model)`` after the optimized model ran; ``explain(model, *inputs)`` traces ``model``
    on the inputs first (exact mode, no Inductor, the model is left as it was);
    ``explain()`` for the last plain ``torch.compile(..., backend="fbcompile")``.
    """
    if not args and not kwargs:
        return Report(_session(model).graphs)
    session = Session(Config(refresh="always", compiler="eager"))
    forward = getattr(model.forward, "_torchdynamo_orig_callable", model.forward)
    with torch.no_grad():
        torch.compile(forward, backend=make_backend(session), dynamic=None)(*args, **kwargs)
    return Report(session.graphs)


def stats(model: torch.nn.Module | None = None) -> Stats:
    """Compile, refresh and reuse counts (totals and per site) since the last reset."""
    return _session(model).stats()


def reset(model: torch.nn.Module | None = None) -> None:
    """Drop every cached external attention result of ``model`` and zero its counters."""
    _session(model).reset()
