"""Parallel layouts: process-group set-up today; one file per parallelism (TP, PP, CP, EP, FSDP) later."""
