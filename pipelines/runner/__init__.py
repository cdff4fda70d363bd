"""The run machine: settings, the `Run` that takes a run folder through its five stages, progress events,
the backend interface (`backend`) and registry, what a family tells the planner (`planning`), the shared upload
checks and the headless CLI (`launch.py train|preview`).

May import: `emloc` only. Reaches backends only through `registry` (names -> "module:Class"), so adding a
model family is one new folder beside this one and its two lines in registry.py (BACKENDS, PLANNING).
"""

from .backend import Backend
from .devices import memory_report
from .machine import Run, distributed_state, library_versions, write_json_atomic
from .progress import Progress, RunCancelled
from .settings import LOSS_LOG, PREVIEW_VARIANTS, RUN_FILE, STAGE_OUTPUT, STAGES, RunSettings, parse_rules

__all__ = ["LOSS_LOG", "PREVIEW_VARIANTS", "RUN_FILE", "STAGES", "STAGE_OUTPUT", "Backend", "Progress", "Run",
           "RunCancelled", "RunSettings", "distributed_state", "library_versions", "memory_report", "parse_rules",
           "write_json_atomic"]
