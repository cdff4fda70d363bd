"""One module per wizard step (model, data, budget, train, preview, export) and Past runs.

Each has `build(ctx)`: it creates the step's components, registers them in the manager as "step.element" and binds
the events whose handlers it owns. Handlers are module-level plain functions `(studio, values) -> values`, by id.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..manager import Manager
from ..studio import Studio


@dataclass
class Context:
    """What every step's build gets: the component registry and the app's long-lived state."""

    manager: Manager
    studio: Studio
