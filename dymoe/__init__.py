"""dymoe: Mixture-of-Experts inference with experts offloaded to a slower memory tier."""

__version__ = "0.1.0"
