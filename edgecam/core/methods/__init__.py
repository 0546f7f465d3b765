"""The explanation methods, by name: the one registry `explain`, `evaluate` and the daemon choose from.

A new method is a Method subclass (methods/base.py) with an entry in REGISTRY (methods/registry.py);
its options are its dataclass fields, filled by make() from whatever options the caller has (the
command line's flags). A method's module is imported when it is first made.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from edgecam.core.errors import EdgecamError
from edgecam.core.methods.base import Maps, Method, Scorer
from edgecam.core.methods.registry import COSTS, REGISTRY, MethodInfo, names

__all__ = ["COSTS", "REGISTRY", "Maps", "Method", "MethodInfo", "Scorer", "check_options", "make", "names",
           "options_of"]


def make(name: str, **options: Any) -> Method:
    """The method `name` with those of `options` it takes (None: its default). One-line error otherwise."""
    takes = options_of(name)
    return REGISTRY[name].load()(**{k: v for k, v in options.items() if k in takes and v is not None})


def options_of(name: str) -> frozenset[str]:
    """The options the method `name` takes: its dataclass fields (its module imported now)."""
    info = REGISTRY.get(name)
    if info is None:
        raise EdgecamError(f"unknown method {name!r}; known: {', '.join(REGISTRY)}")
    return frozenset(f.name for f in dataclasses.fields(info.load()) if f.init)


def check_options(chosen: Sequence[str], given: Mapping[str, Any]) -> None:
    """Refuses a method option that was given (not None) while none of the chosen methods takes it:
    one line naming the option and the methods it applies to. The other methods' modules are
    imported only to say so."""
    for option, value in given.items():
        if value is None or any(option in options_of(m) for m in chosen):
            continue
        takers = [n for n in REGISTRY if option in options_of(n)]
        raise EdgecamError(f"--{option.replace('_', '-')} applies to --method {', '.join(takers)}; "
                           f"not to {', '.join(chosen)}")
