"""Sweep files: ``python -m prosparse_jax.main.sweep <command> --sweep=configs/sweeps/<file>.py:<arg>``."""
