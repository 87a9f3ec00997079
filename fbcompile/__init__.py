"""fbcompile: FlashBlock-style reuse of block-external attention, as a torch.compile pass.

``fbcompile.optimize(model)`` or ``torch.compile(model, backend="fbcompile")``; inspect with
``fbcompile.explain`` and ``fbcompile.stats``. Set ``FBCOMPILE_LOG=info`` (or ``debug``) to log.
"""
import logging as _logging
import os as _os

from fbcompile.api import backend, commit, explain, new_request, optimize, reset, stats
from fbcompile.backends.session import SiteStats, Stats
from fbcompile.config import Config, ReusePlan, Sparse
from fbcompile.measure import Calibration, FidelityReport, calibrate, fidelity
from fbcompile.report import Report

__all__ = ["Config", "ReusePlan", "Sparse", "optimize", "explain", "stats", "reset", "new_request", "commit",
           "backend", "fidelity", "calibrate", "Calibration", "Report", "Stats", "SiteStats", "FidelityReport"]

_log = _logging.getLogger("fbcompile")
_log.addHandler(_logging.NullHandler())
if _os.environ.get("FBCOMPILE_LOG"):
    _level = _os.environ["FBCOMPILE_LOG"].upper()
    _log.setLevel(_level if _level in ("DEBUG", "INFO", "WARNING") else "INFO")
    _log.addHandler(_logging.StreamHandler())
