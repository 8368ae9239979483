"""Parallel layouts, process groups, one file per parallelism, the launcher seam (local and Ray) and what each rank
does first and last (``rank``)."""
