"""Inductor can rebuild every fbcompile Triton kernel from source.

A compiled graph does not launch the kernel objects: Inductor writes the kernel's source, and that
of the ``@triton.jit`` functions it calls, into the graph's generated code and compiles it in a
worker process. It writes each such function under its own name, so a function called under another
name (``from m import dot as _dot``) is missing there: the compile fails, and fbcompile runs the
whole graph without Inductor (a warning; on the H200 a 28-layer block took 30 ms instead of 18).
Checked here on the CPU with Inductor's own source generator.
"""
from __future__ import annotations

import builtins
import dis
import importlib.util
import os

import pytest

if os.environ.get("TRITON_INTERPRET") == "1":  # kernels are interpreter functions then, not Inductor's input
    pytest.skip("Triton's interpreter is on in this process", allow_module_level=True)

triton = pytest.importorskip("triton")
wrapper = pytest.importorskip("torch._inductor.codegen.wrapper")

from fbcompile.kernels import triton_attention, triton_linear  # noqa: E402

KERNELS = [(module, name) for module in (triton_attention, triton_linear) for name, value in vars(module).items()
           if isinstance(value, triton.runtime.jit.JITFunction) and name.endswith("_kernel")]


@pytest.mark.parametrize("module,name", KERNELS, ids=[name for _, name in KERNELS])
def test_generated_source_defines_every_name(module, name, tmp_path):
    source = wrapper.user_defined_triton_kernel_transitive_closure_source_code(getattr(module, name))
    path = tmp_path / "generated_kernel.py"
    path.write_text("import triton\nimport triton.language as tl\n" + source)
    spec = importlib.util.spec_from_file_location("generated_kernel", path)
    generated = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generated)
    missing = {(fn, inst.argval) for fn, value in vars(generated).items()
               if isinstance(value, triton.runtime.jit.JITFunction) or callable(value) and fn == name
               for inst in dis.Bytecode(getattr(value, "fn", value))
               if inst.opname == "LOAD_GLOBAL" and not hasattr(generated, inst.argval)
               and not hasattr(builtins, inst.argval)}
    assert not missing, f"names the generated source of {name} does not define: {sorted(missing)}"


def test_kernels_found():
    assert {"_attn_kernel", "_reduce_kernel", "_sparse_attn_kernel", "_linear_kernel", "_sum_splits_kernel"} <= {
        name for _, name in KERNELS}
