"""Small helpers over dynamo's torch-level FX graphs: op names, arguments, shapes, dependencies.

Dynamo writes the same operation as ``torch.transpose(x, 1, 2)`` (call_function) or
``x.transpose(1, 2)`` (call_method); :func:`op_name` maps both to ``"transpose"`` so that the
matchers are written once.
"""
from __future__ import annotations

import contextlib
import hashlib
import operator

import networkx as nx
import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensor
from torch.fx.experimental.symbolic_shapes import statically_known_true

try:  # torch >= 2.12
    from torch.fx.experimental.symbolic_shapes import guarding_hint_or_throw as _hint
except ImportError:  # torch 2.11: a backed symbol's node carries its hint
    def _hint(a):
        return a.node.require_hint()

_FUNCTION_NAMESPACES = {"torch", "torch.nn.functional", "torch._C._nn", "torch._C._VariableFunctions",
                        "_operator", "operator", "torch.functional", "torch._tensor", "torch._C"}


def traced_value(a: int | torch.SymInt | torch.SymBool) -> int | bool:
    """The value a size had when traced (a symbol's hint), read without adding a guard."""
    return _hint(a) if isinstance(a, (torch.SymInt, torch.SymBool)) else a


def op_name(node: fx.Node) -> str | None:
    """Canonical name of a call node (``"cat"``, ``"transpose"``, ``"add_"``...), None for others."""
    if node.op == "call_method":
        return node.target
    if node.op == "call_function":
        name = getattr(node.target, "__name__", None)
        module = getattr(node.target, "__module__", None) or ""
        if name and (module in _FUNCTION_NAMESPACES or module.startswith("torch") or node.target in vars(operator).values()):
            return name
    return None


def arg(node: fx.Node, index: int, name: str, default=None):
    """Argument ``name`` of a call, given positionally (``index`` counts ``self`` for methods) or by keyword."""
    if name in node.kwargs:
        return node.kwargs[name]
    if index < len(node.args):
        return node.args[index]
    return default


def recorded(node: fx.Node):
    """What dynamo (``example_value``) or a trace (``val``) recorded for ``node``: a fake tensor, a SymInt..."""
    return node.meta.get("example_value", node.meta.get("val"))


def example(node) -> torch.Tensor | None:
    """The fake tensor dynamo recorded for ``node`` (None when it is not a tensor)."""
    value = recorded(node) if isinstance(node, fx.Node) else None
    return value if isinstance(value, torch.Tensor) else None


class NoExample(Exception):
    """A node whose shapes cannot be known (an op fake tensors cannot run)."""


def fill_examples(*nodes: fx.Node) -> None:
    """Give ``nodes`` and their ancestors the example values passes did not record (the nodes the split
    emits), run on the fake tensors of their inputs; raises :class:`NoExample` where an op cannot run."""
    missing, stack = {}, list(nodes)
    while stack:
        n = stack.pop()
        if (n not in missing and n.op in ("call_function", "call_method") and "example_value" not in n.meta
                and "val" not in n.meta):
            missing[n] = None
            stack.extend(n.all_input_nodes)
    if not missing:
        return
    known = [recorded(a) for n in missing for a in n.all_input_nodes if a not in missing]
    modes = [v.fake_mode for v in known if isinstance(v, FakeTensor)]
    with modes[0] if modes else contextlib.nullcontext():
        for n in (n for n in nodes[0].graph.nodes if n in missing):
            args, kwargs = fx.node.map_arg((n.args, n.kwargs), recorded)
            target = getattr(args[0], n.target) if n.op == "call_method" else n.target
            try:
                n.meta["example_value"] = target(*(args[1:] if n.op == "call_method" else args), **kwargs)
            except Exception as error:  # an op fake tensors cannot run: no shapes to prove anything with
                raise NoExample(f"no shape for '{n.name}' ({type(error).__name__})") from error


def erase_unused(graph: fx.Graph, node: fx.Node) -> None:
    """Erase ``node`` if nothing reads it, and so on up its inputs (placeholders stay)."""
    unused = [node]
    while unused:
        dead = unused.pop()
        if dead.op != "placeholder" and not dead.users and not dead._erased:
            unused += dead.all_input_nodes
            graph.erase_node(dead)


LINEARS = (torch._C._nn.linear, torch.nn.functional.linear)  # how dynamo records a linear


def linear_operands(node: fx.Node):
    """``(input, weight, bias)`` of a linear call node."""
    return arg(node, 0, "input"), arg(node, 1, "weight"), arg(node, 2, "bias")


def static_layout(t: torch.Tensor | None) -> bool:
    """``t`` (an example value) has static sizes and strides (None counts as static)."""
    return t is None or all(isinstance(d, int) for d in (*t.shape, *t.stride()))


def shape(node) -> tuple | None:
    value = example(node)
    return tuple(value.shape) if value is not None else None


def same_size(a, b) -> bool:
    """True when two (possibly symbolic) sizes are provably equal."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return bool(statically_known_true(a == b))


def describe_shape(node) -> str:
    s = shape(node)
    return "?" if s is None else "x".join(str(d) if isinstance(d, int) else f"({d})" for d in s)


def is_tensor_placeholder(node: fx.Node) -> bool:
    return node.op == "placeholder" and example(node) is not None


def source_name(node: fx.Node) -> str:
    """Where dynamo took a placeholder from (``L['self']...``, ``L['past_k']``): stable across recompiles."""
    source = getattr(node.meta.get("grapharg"), "source", None)
    return source.name() if callable(getattr(source, "name", None)) else str(getattr(source, "name", node.target))


def fingerprint(roots, extra=(), opaque=frozenset()) -> int:
    """A hash of how ``roots`` are computed: every op, constant argument, dtype and static size on the
    way (symbolic sizes as ``s``), graph inputs by :func:`source_name`. Equal for the same computation
    in two graphs dynamo compiled from one piece of code; different when a constant differs. Nodes in
    ``opaque`` count as inputs whose computation does not matter (the caller guards their values)."""
    roots = [r for r in roots if isinstance(r, fx.Node)]
    if not roots:
        return 0
    seen, stack = set(), list(roots)
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes if n not in opaque else ())
    order = {n: i for i, n in enumerate(roots[0].graph.nodes)}
    nodes = sorted(seen, key=order.__getitem__)
    index = {n: i for i, n in enumerate(nodes)}

    def static(value):
        if isinstance(value, torch.Tensor):
            return (str(value.dtype), tuple(d if isinstance(d, int) else "s" for d in value.shape))
        return value if isinstance(value, (int, float, bool, str, type(None))) else type(value).__name__

    rows = [("input", source_name(n), static(example(n))) if n.op == "placeholder" else ("opaque",) if n in opaque else
            (n.op, op_name(n) or str(n.target),
             fx.node.map_aggregate((n.args, n.kwargs), lambda a: f"%{index[a]}" if isinstance(a, fx.Node) else static(a)),
             static(example(n)))
            for n in nodes]
    text = repr((rows, [index[r] for r in roots], [static(e) for e in extra]))
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def is_parameter(node: fx.Node) -> bool:
    """A placeholder dynamo lifted from a module parameter (constant across denoising steps)."""
    grapharg = node.meta.get("grapharg")
    if isinstance(getattr(grapharg, "example", None), torch.nn.Parameter):
        return True
    return "_parameters[" in source_name(node)


def is_module_state(node: fx.Node) -> bool:
    """A placeholder dynamo lifted from the module (parameter, buffer, tensor attribute of ``self``)."""
    return is_parameter(node) or source_name(node).startswith("L['self']")


def mutated_tensor(node: fx.Node) -> fx.Node | None:
    """The tensor a node writes in place (``x.add_(..)``, ``x[i] = y``, ``out=``), or None."""
    name = op_name(node)
    if name is None:
        return None
    if name == "setitem" or (name.endswith("_") and not name.startswith("_")):
        target = node.args[0] if node.args else None
        return target if isinstance(target, fx.Node) else None
    out = node.kwargs.get("out")
    return out if isinstance(out, fx.Node) else None


def qualified_op_name(target) -> str | None:
    """``"namespace::name"`` of a custom op call's target (``torch.ops.flash_attn._flash_attn_forward``), else None."""
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target._qualified_op_name
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.name
    return None


def op_arguments(node: fx.Node) -> tuple[dict, dict] | None:
    """``(arguments, defaults)`` of an op call by its schema's argument names: every argument's value as
    given or defaulted, and the schema's defaults. None when the target has no single schema (an overload
    packet with several) or the call does not bind to it."""
    target = node.target
    if isinstance(target, torch._ops.OpOverloadPacket):
        if target.overloads() != ["default"]:
            return None
        target = target.default
    if not isinstance(target, torch._ops.OpOverload):
        return None
    schema = target._schema.arguments
    if len(node.args) > len(schema) or set(node.kwargs) - {a.name for a in schema}:
        return None
    arguments, defaults = {}, {}
    for index, argument in enumerate(schema):
        if argument.has_default_value():
            defaults[argument.name] = argument.default_value
        if index < len(node.args):
            arguments[argument.name] = node.args[index]
        elif argument.name in node.kwargs:
            arguments[argument.name] = node.kwargs[argument.name]
        elif argument.has_default_value():
            arguments[argument.name] = argument.default_value
        else:
            return None
    return arguments, defaults


def may_write_unseen(node: fx.Node) -> bool:
    """May ``node`` write a tensor argument in place where :func:`mutated_tensor` cannot tell: an op whose
    schema marks an argument written (a custom op, an aten in-place op), a higher-order op (a user's Triton
    kernel)?"""
    target = node.target
    if isinstance(target, torch._ops.HigherOrderOperator):
        return True
    if isinstance(target, torch._ops.OpOverloadPacket):
        overloads = [getattr(target, name) for name in target.overloads()]
    else:
        overloads = [target] if isinstance(target, torch._ops.OpOverload) else []
    return any(a.alias_info is not None and a.alias_info.is_write for op in overloads for a in op._schema.arguments)


def writes_between(first: fx.Node, last: fx.Node) -> bool:
    """Whether a node after ``first`` and before ``last`` (same graph, in that order) may write a tensor in
    place: work of ``last`` moved before ``first`` could then read a value the write changes."""
    node = first.next
    while node is not last and node.op != "root":
        if mutated_tensor(node) is not None or may_write_unseen(node):
            return True
        node = node.next
    return False


METADATA_OPS = {"size", "dim", "numel", "stride", "sym_size", "sym_numel", "sym_stride", "storage_offset"}


class DependencyGraph:
    """Data dependencies of an FX graph, including writes made in place.

    An in-place write ``x.copy_(y)`` makes every later reader of ``x`` depend on ``y``; plain FX
    edges miss that, so the write's inputs are added as parents of the written tensor's base.
    Reading a tensor's size is not a data dependency (positions derived from the cache length are
    the usual case), so those edges are left out.
    """

    def __init__(self, graph: fx.Graph):
        self.graph = nx.DiGraph()
        self.mutations: dict[fx.Node, list[fx.Node]] = {}
        for node in graph.nodes:
            self.graph.add_node(node)
            if op_name(node) in METADATA_OPS:
                continue  # a tensor's size is not its data: cache length may steer positions
            for parent in node.all_input_nodes:
                self.graph.add_edge(parent, node)
        for node in graph.nodes:
            target = mutated_tensor(node)
            if target is None:
                continue
            base = view_base(target)
            self.mutations.setdefault(base, []).append(node)
            for parent in node.all_input_nodes:
                if parent is not target and parent is not base and not nx.has_path(self.graph, base, parent):
                    self.graph.add_edge(parent, base)
        self._inputs: dict[fx.Node, frozenset[fx.Node]] = {}

    def tensor_inputs(self, node: fx.Node) -> frozenset[fx.Node]:
        """The tensor placeholders ``node`` depends on."""
        if node not in self._inputs:
            nodes = nx.ancestors(self.graph, node) | {node}
            self._inputs[node] = frozenset(n for n in nodes if is_tensor_placeholder(n))
        return self._inputs[node]


VIEW_OPS = {"view", "reshape", "transpose", "permute", "unsqueeze", "squeeze", "expand", "getitem",
            "narrow", "select", "slice", "flatten", "unflatten", "mT", "contiguous", "detach", "view_as"}


def one_dim_slice(index) -> tuple[int, slice] | None:
    """``(dim, s)`` if the index ``index`` is ``(:, ..., :, s)``: a slice without a step along its last
    indexed dim (``cache[:, a:b]``), else None."""
    index = index if isinstance(index, tuple) else (index,)
    if not index or not all(i == slice(None) for i in index[:-1]):
        return None
    last = index[-1]
    return (len(index) - 1, last) if isinstance(last, slice) and last.step is None else None


def view_base(node: fx.Node) -> fx.Node:
    """Follow view-like ops back to the tensor whose storage they share (conservatively)."""
    while op_name(node) in VIEW_OPS and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


_SIZE_QUERIES = {"size", "dim", "sym_size", "stride", "numel"}


def reads_data(node: fx.Node) -> bool:
    """Whether a graph reads ``node``'s elements, not only its sizes (``x.size(2)``, ``x.dim()``)."""
    return any(op_name(user) not in _SIZE_QUERIES
               and not (op_name(user) == "getattr" and user.args[1:] in (("shape",), ("ndim",)))
               for user in node.users)


def tensor_free(gm: fx.GraphModule) -> bool:
    """Whether no op of ``gm`` takes or makes a tensor: an empty graph (all its ops moved out, or dynamo's
    graph between two breaks with nothing in it) or one computing ints from its int inputs and sizes
    (``current_start // frame_seqlen`` after Wan's ``.item()``). An op whose value was not recorded counts
    as one that does."""
    def holds_tensor(value) -> bool:
        return value is None or any(isinstance(leaf, torch.Tensor) for leaf in torch.utils._pytree.tree_leaves(value))

    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        if node.op == "get_attr" or holds_tensor(recorded(node)) or any(
                holds_tensor(recorded(n)) for n in node.all_input_nodes if n.op != "get_attr"):
            return False
    return True


def copy_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` to rewrite (its nodes' metadata shared), ``gm`` left as it is."""
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    return fx.GraphModule(gm, graph)
