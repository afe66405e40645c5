"""Plug-in use of prefix_grouper in model libraries."""
