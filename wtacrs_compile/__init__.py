"""wtacrs_compile: a torch.compile backend that estimates weight gradients with WTA-CRS.

    model = torch.compile(model, backend="wtacrs")                       # by entry point
    model = torch.compile(model, backend=wtacrs_compile.backend(ratio=0.3))
"""

from .backend import WTACRSBackend, backend, compile_module, wtacrs
from .annotate import annotate, annotate_module, unannotate_module
from .config import MODES, Rule, WTACRSConfig, WTACRSRuleWarning
from .report import CompileReport, OpRecord, clear_reports, recent_reports
from .inspection import InspectReport, inspect
from .rng import manual_seed

__all__ = [
    "MODES",
    "CompileReport",
    "OpRecord",
    "Rule",
    "WTACRSBackend",
    "WTACRSConfig",
    "WTACRSRuleWarning",
    "annotate",
    "annotate_module",
    "backend",
    "clear_reports",
    "compile_module",
    "manual_seed",
    "recent_reports",
    "unannotate_module",
    "wtacrs",
]
__version__ = "0.1.0"
