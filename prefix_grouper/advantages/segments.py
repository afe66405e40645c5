"""The earlier name of :mod:`prefix_grouper.advantages.grouping`, kept so that code importing it keeps working."""
from .grouping import Segments

__all__ = ["Segments"]
