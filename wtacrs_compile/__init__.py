"""wtacrs_compile: a torch.compile backend that estimates weight gradients with WTA-CRS.

    model = torch.compile(model, backend="wtacrs")                       # by entry point
    model = torch.compile(model, backend=wtacrs_compile.backend(ratio=0.3))
"""

from .backend import WTACRSBackend, backend, wtacrs
from .config import MODES, Rule, WTACRSConfig
from .report import CompileReport, OpRecord, clear_reports, recent_reports
from .inspection import InspectReport, inspect

__all__ = [
    "MODES",
    "CompileReport",
    "OpRecord",
    "Rule",
    "WTACRSBackend",
    "WTACRSConfig",
    "backend",
    "clear_reports",
    "recent_reports",
    "wtacrs",
]
__version__ = "0.1.0"
