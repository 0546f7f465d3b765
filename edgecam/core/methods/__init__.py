"""The explanation methods, by name: the one registry `explain`, `evaluate` and the daemon choose from.

A new method is a Method subclass (methods/base.py) added to REGISTRY; its options are its
dataclass fields, filled by make() from whatever options the caller has (the command line's flags).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from edgecam.core.errors import EdgecamError
from edgecam.core.methods.base import COSTS, Maps, Method, Scorer
from edgecam.core.methods.baseline import RandomMap
from edgecam.core.methods.cam import Cam
from edgecam.core.methods.lime import Lime
from edgecam.core.methods.occlusion import Occlusion
from edgecam.core.methods.rise import Rise
from edgecam.core.methods.scorecam import ScoreCam
from edgecam.core.methods.wide import WideCam

__all__ = ["COSTS", "REGISTRY", "Maps", "Method", "Scorer", "make", "names"]

REGISTRY: dict[str, type[Method]] = {
    m.name: m for m in (Cam, Occlusion, WideCam, Lime, ScoreCam, Rise, RandomMap)
}


def names(costs: tuple[str, ...] = COSTS, square_input: bool | None = None) -> list[str]:
    """Method names of the given costs (and input kind), in registry order."""
    return [n for n, m in REGISTRY.items()
            if m.cost in costs and (square_input is None or m.square_input == square_input)]


def make(name: str, **options: Any) -> Method:
    """The method `name` with those of `options` it takes (None: its default). One-line error otherwise."""
    cls = REGISTRY.get(name)
    if cls is None:
        raise EdgecamError(f"unknown method {name!r}; known: {', '.join(REGISTRY)}")
    takes = {f.name for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in options.items() if k in takes and v is not None})
