"""DynTRM: a Dynamic Tiny Recursive Model for ARC-AGI puzzles."""

__version__ = "0.1.0"
