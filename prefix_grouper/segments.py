"""The earlier name of :mod:`prefix_grouper.micro_batches`, kept so that code importing it keeps working."""
from .micro_batches import group_row_ranges, micro_batch_groups

__all__ = ["group_row_ranges", "micro_batch_groups"]
