"""Datasets: uploads read in a process of their own, parsing and its limits, label limits, storage."""
