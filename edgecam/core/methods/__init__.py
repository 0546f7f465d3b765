"""The explanation methods, by name: the one registry `explain`, `evaluate` and the daemon choose from.

A new method is a Method subclass (methods/base.py) with an entry in REGISTRY (methods/registry.py);
its options are its dataclass fields, filled by make() from whatever options the caller has (the
command line's flags). A method's module is imported when it is first made.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from edgecam.core.errors import EdgecamError
from edgecam.core.methods.base import Maps, Method, Scorer
from edgecam.core.methods.registry import COSTS, REGISTRY, MethodInfo, names

__all__ = ["COSTS", "REGISTRY", "Maps", "Method", "MethodInfo", "Scorer", "make", "names"]


def make(name: str, **options: Any) -> Method:
    """The method `name` with those of `options` it takes (None: its default). One-line error otherwise."""
    info = REGISTRY.get(name)
    if info is None:
        raise EdgecamError(f"unknown method {name!r}; known: {', '.join(REGISTRY)}")
    cls = info.load()
    takes = {f.name for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in options.items() if k in takes and v is not None})
