"""The explanation methods by name, without importing them: what each costs, takes and does.

The command line lists the methods in its help and choices, and `edgecam run` makes only the CAM; a
method's module (and what it imports: Score-CAM the stage reader, LIME the superpixels) is imported
when the method is made, so a daemon holds none of the offline methods in memory. A method's class
takes its cost, summary and input kind from its entry here (Method.__init_subclass__): this is where
they are declared.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

# How much a map costs beyond the prediction's own inference, which decides where it is offered:
# "frame": nothing, or next to nothing (the daemon may run it on every frame);
# "map": tens of inferences (offered offline, and in evaluate by default);
# "many": hundreds (offered offline; evaluate runs it when asked).
COSTS = ("frame", "map", "many")


@dataclass(frozen=True)
class MethodInfo:
    name: str
    module: str  # in edgecam.core.methods
    cls: str
    cost: str
    summary: str  # one line for --help and the docs
    # A method that prepares its own input (another shape) cannot be scored on the square input.
    square_input: bool = True

    def load(self) -> type:
        """The method's class, a Method (its module imported now, if it was not). This module
        imports no method, not even base.py, which takes each method's entry from here."""
        module = importlib.import_module(f"edgecam.core.methods.{self.module}")
        return getattr(module, self.cls)  # type: ignore[no-any-return]


REGISTRY: dict[str, MethodInfo] = {m.name: m for m in (
    MethodInfo("cam", "cam", "Cam", "frame",
               "the class activation map: the classifier's weights over the last feature map (no extra inference)"),
    MethodInfo("occlusion", "occlusion", "Occlusion", "map",
               "the score drop under a sliding grey patch, one inference per patch position"),
    MethodInfo("wide", "wide", "WideCam", "frame",
               "the CAM with the frame's aspect kept: short side at the input size, a wider map (7x13 for 16:9), "
               "for models pooled with MEAN", square_input=False),
    MethodInfo("lime", "lime", "Lime", "many",
               "superpixels switched on and off (--samples inferences), a weighted linear fit of the score: "
               "each segment's weight"),
    MethodInfo("scorecam", "scorecam", "ScoreCam", "many",
               "Score-CAM at a stage (--stage, default the last): each channel masks the input, its class "
               "score weights it (--channels K inferences)"),
    MethodInfo("rise", "rise", "Rise", "many",
               "random coarse masks (--samples inferences), the class scores as their weights"),
    MethodInfo("random", "baseline", "RandomMap", "frame",
               "uniform noise on the CAM's grid, seeded: the baseline a real method must beat"),
)}


def names(costs: tuple[str, ...] = COSTS, square_input: bool | None = None) -> list[str]:
    """Method names of the given costs (and input kind), in registry order."""
    return [n for n, m in REGISTRY.items()
            if m.cost in costs and (square_input is None or m.square_input == square_input)]
