"""fbcompile: FlashBlock-style reuse of block-external attention, as a torch.compile pass.

``fbcompile.optimize(model)`` or ``torch.compile(model, backend="fbcompile")``; inspect with
``fbcompile.explain`` and ``fbcompile.stats``. Set ``FBCOMPILE_LOG=info`` (or ``debug``) to log.
"""
import logging as _logging
import os as _os

from fbcompile.api import explain, optimize, reset, stats
from fbcompile.config import Config, ReusePlan
from fbcompile.fidelity import Calibration, calibrate, fidelity

__all__ = ["Config", "ReusePlan", "optimize", "explain", "stats", "reset", "fidelity", "calibrate", "Calibration"]

_log = _logging.getLogger("fbcompile")
_log.addHandler(_logging.NullHandler())
if _os.environ.get("FBCOMPILE_LOG"):
    _level = _os.environ["FBCOMPILE_LOG"].upper()
    _log.setLevel(_level if _level in ("DEBUG", "INFO", "WARNING") else "INFO")
    _log.addHandler(_logging.StreamHandler())
