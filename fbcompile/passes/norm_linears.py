"""Apply an RMSNorm as the GEMMs after it load their input: ``norm_scale=`` of fbcompile's linears.

Dynamo records a decoder layer's RMSNorm in one of these forms (``h`` half precision, ``D`` its last
dim, ``w`` the norm's ``[D]`` weight)::

    hf = h.float()                                   # or h.to(torch.float32)
    n = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    out = w * n.to(torch.bfloat16)                   # Llama, Qwen2 (either operand order)
    out = (n * (1.0 + w.float())).type_as(h)         # Gemma: any [D] scale, then the cast
    out = torch.nn.functional.rms_norm(h, (D,), w, eps)

and feeds ``out`` to projections that :mod:`~fbcompile.passes.group_linears` and
:mod:`~fbcompile.passes.gated_linears` made launches of fbcompile's skinny-GEMM kernel::

    qkv = torch.ops.fbcompile.linear_group(out, [wq, wk, wv], [bq, bk, bv])

which becomes::

    qkv = torch.ops.fbcompile.linear_group(h, [wq, wk, wv], [bq, bk, bv], None, w, eps)

The kernel takes each row's sum of squares from the tiles of ``h`` its reduction loads anyway, scales
them by ``w`` before the dot and the result by the row's ``rsqrt`` (``fbcompile.ops.rms_norm``: one
rounding where the model's form may round twice). Inductor runs the norm, with the residual add
before it, as a kernel of its own (2.1-2.4 us per layer and step for a 1.5B model on the H200,
``benchmarks/results/profile_lm_32k_b1_gated_h200.md``); with the add in the previous GEMM
(:mod:`~fbcompile.passes.residual_linears`) that kernel is gone. A norm whose output anything else
reads, a norm of some other form (a mean subtracted: LayerNorm), and scales the kernel does not take
are left as they are.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.fx as fx
import torch.nn.functional as F

from fbcompile.ops import gated_linear_supported, linear_group_supported
from fbcompile.passes.graph_utils import arg, example, op_name

_LINEAR_OPS = {torch.ops.fbcompile.linear_group.default: 4, torch.ops.fbcompile.gated_linear.default: 6}
# op -> the index of its ``norm_scale`` argument (``eps`` follows it)
_RMS_NORMS = (F.rms_norm, torch.rms_norm)


class _Norm(NamedTuple):
    """A matched RMSNorm: its input, its ``[D]`` scale and its epsilon."""

    x: fx.Node
    scale: fx.Node
    eps: float


def _call(node, *names: str) -> bool:
    return isinstance(node, fx.Node) and op_name(node) in names


def _cast_of(node) -> fx.Node | None:
    """The operand of ``node`` if it is a cast to another dtype (``.float()``, ``.to(dtype)``,
    ``.type_as(t)``), else None."""
    if _call(node, "float", "to", "type_as") and node.op == "call_method":
        value, source = example(node), example(node.args[0])
        if value is not None and source is not None and len(node.args) <= 2 and set(node.kwargs) <= {"dtype"}:
            return node.args[0]
    return None


def _eps(node) -> float | None:
    """``eps`` of ``node = var + eps`` (either order) with ``var`` a float constant; else None."""
    if not _call(node, "add") or len(node.args) != 2 or node.kwargs:
        return None
    a, b = node.args
    if isinstance(b, float) and isinstance(a, fx.Node):
        return b
    if isinstance(a, float) and isinstance(b, fx.Node):
        return a
    return None


def _normalised(node) -> fx.Node | None:
    """``h`` where ``node`` is ``hf * rsqrt(mean(hf^2, -1, keepdim=True) + eps)`` with ``hf`` a float32
    cast of ``h`` (either operand order); else None. The epsilon is :func:`_norm_eps`'s."""
    if not _call(node, "mul") or len(node.args) != 2 or node.kwargs:
        return None
    for hf, rs in (node.args, reversed(node.args)):
        if _call(rs, "rsqrt") and _eps(rs.args[0]) is not None and _mean_square_of(rs.args[0]) is hf:
            h = _cast_of(hf)
            if h is not None and example(hf).dtype == torch.float32:
                return h
    return None


def _norm_eps(normalised: fx.Node) -> float:
    rs = next(a for a in normalised.args if _call(a, "rsqrt"))
    return _eps(rs.args[0])


def _mean_square_of(add: fx.Node) -> fx.Node | None:
    """``hf`` where ``add``'s tensor operand is ``hf.pow(2).mean(-1, keepdim=True)``; else None."""
    var = next(a for a in add.args if isinstance(a, fx.Node))
    if not _call(var, "mean") or not arg(var, 2, "keepdim", False):
        return None
    dim = arg(var, 1, "dim")
    square = arg(var, 0, "input")
    value = example(var)
    if value is None or dim not in (-1, value.dim() - 1, [-1], (-1,), [value.dim() - 1], (value.dim() - 1,)):
        return None
    if _call(square, "pow") and arg(square, 1, "exponent") == 2:
        return arg(square, 0, "input")
    return None


def _depends_on(node, target: fx.Node, limit: int = 8) -> bool:
    """Whether ``node`` is computed from ``target`` within ``limit`` steps (a scale must not be)."""
    if node is target:
        return True
    return limit > 0 and isinstance(node, fx.Node) and any(
        _depends_on(n, target, limit - 1) for n in node.all_input_nodes)


def _rms_norm(out: fx.Node) -> _Norm | None:
    """The RMSNorm ``out`` computes (the module docstring's forms), or None."""
    if out.op == "call_function" and out.target in _RMS_NORMS:
        x, shape, scale, eps = (arg(out, 0, "input"), arg(out, 1, "normalized_shape"), arg(out, 2, "weight"),
                                arg(out, 3, "eps"))
        value = example(x)
        if (isinstance(scale, fx.Node) and isinstance(eps, float) and value is not None
                and list(shape) == [value.shape[-1]]):
            return _Norm(x, scale, eps)
        return None
    inner = _cast_of(out)
    scaled = inner if inner is not None else out
    if not _call(scaled, "mul") or len(scaled.args) != 2 or scaled.kwargs:
        return None
    for n, scale in (scaled.args, reversed(scaled.args)):
        if not isinstance(scale, fx.Node):
            continue
        # Llama's ``w * n.to(dtype)`` or Gemma's ``(n * s).type_as(h)``; the caller checks the dtype
        for normalised in (n, _cast_of(n)):
            h = _normalised(normalised) if normalised is not None else None
            if h is not None and not _depends_on(scale, h):
                return _Norm(h, scale, _norm_eps(normalised))
    return None


def norm_linears(gm: fx.GraphModule) -> list[str]:
    """Rewrite ``gm`` in place: an RMSNorm read only by fbcompile's linear ops (as their input) is
    applied by them; returns one line per norm moved."""
    made = []
    for out in list(gm.graph.nodes):
        users = list(out.users)
        if out.op != "call_function" and out.op != "call_method" or not users:
            continue
        if not all(u.op == "call_function" and u.target in _LINEAR_OPS and u.args[0] is out
                   and out not in u.args[1:] and not _has_norm(u) for u in users):
            continue
        norm = _rms_norm(out)
        if norm is None:
            continue
        xv, sv, ov = example(norm.x), example(norm.scale), example(out)
        if (xv is None or sv is None or ov is None or ov.dtype != xv.dtype or ov.shape != xv.shape
                or sv.dim() != 1 or sv.shape[0] != xv.shape[-1] or not all(_supported(u, xv, sv) for u in users)):
            continue
        for user in users:
            at = _LINEAR_OPS[user.target]
            args = list(user.args) + [None] * (at + 2 - len(user.args))
            args[0], args[at], args[at + 1] = norm.x, norm.scale, norm.eps
            user.args = tuple(args)
        _erase_unused(gm.graph, out)
        made.append(f"RMSNorm of {norm.x} (scale {norm.scale}) in {', '.join(u.name for u in users)}")
    if made:
        gm.graph.lint()
        gm.recompile()
    return made


def _erase_unused(graph: fx.Graph, node: fx.Node) -> None:
    """Erase ``node`` and then its inputs while nothing reads them (the norm's own ops; never a
    placeholder or an attribute)."""
    if node.users or node.op not in ("call_function", "call_method"):
        return
    inputs = node.all_input_nodes
    graph.erase_node(node)
    for n in inputs:
        _erase_unused(graph, n)


def _has_norm(user: fx.Node) -> bool:
    at = _LINEAR_OPS[user.target]
    return len(user.args) > at and user.args[at] is not None


def _supported(user: fx.Node, xv: torch.Tensor, sv: torch.Tensor) -> bool:
    """Whether ``user`` runs on the kernel with the norm moved in (else moving it would not pay)."""
    values = [example(a) if isinstance(a, fx.Node) else [example(n) if n is not None else None for n in a]
              if isinstance(a, (list, tuple)) else a for a in user.args]
    if user.target is torch.ops.fbcompile.gated_linear.default:
        return gated_linear_supported(xv, *values[1:6], norm_scale=sv)
    residual = values[3] if len(values) > 3 else None
    return linear_group_supported(xv, values[1], values[2], residual=residual, norm_scale=sv)
