"""Running Triton kernel tests without a GPU: Triton's CPU interpreter (``TRITON_INTERPRET=1``).

The variable must be set before ``triton`` is first imported in the process. A kernel test module
imports this first: :func:`enable` switches the interpreter on if it still can; otherwise (another
module imported ``triton`` already) the module's kernel cases rerun once in a subprocess with the
variable set (:func:`rerun_in_subprocess`).
"""
from __future__ import annotations

import os
import subprocess
import sys

import torch

CUDA = torch.cuda.is_available()


def enable() -> bool:
    """Whether Triton kernels can run in this process (natively or interpreted)."""
    if not CUDA and "triton" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"
    return CUDA or os.environ.get("TRITON_INTERPRET") == "1"


def rerun_in_subprocess(test_file: str, keyword: str | None = None) -> None:
    """Run ``test_file``'s tests (those matching ``keyword``) under the interpreter; fail with their output."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    select = ["-k", keyword] if keyword else []
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *select, test_file],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
