"""The framework-free RELEX engine: buffer, fit → candidates → predictions → report, load, trial.

* :mod:`relex_callback.engine.engine`: :class:`RelexEngine`, the buffer placement rule and the saved state;
* :mod:`relex_callback.engine.candidate`: :class:`Candidate` and :class:`TrendSpec`;
* :mod:`relex_callback.engine.report`: the ``relex-report/2`` schema, its reader and the model card;
* :mod:`relex_callback.engine.window`: :class:`~relex_callback.engine.window.Window`, the set-up refusals, the snapshot
  schedule and the one halt path every adapter drives;
* :mod:`relex_callback.engine.jump`: :class:`~relex_callback.engine.jump.JumpController`, jump mode.
"""

from .candidate import Candidate, TrendSpec
from .engine import STATE_FILE_NAME, STATE_FORMAT_VERSION, BufferPlan, Probe, RelexEngine, plan_buffer, register_candidate_family
from .report import REPORT_FORMAT, check_report_format, read_report

__all__ = [
    "Candidate",
    "TrendSpec",
    "RelexEngine",
    "BufferPlan",
    "Probe",
    "plan_buffer",
    "register_candidate_family",
    "STATE_FILE_NAME",
    "STATE_FORMAT_VERSION",
    "REPORT_FORMAT",
    "check_report_format",
    "read_report",
]
