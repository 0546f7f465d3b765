"""edgecam: explainable image classification on Raspberry Pi-class boards."""

__version__ = "0.1.0"
