"""Sweep files: ``python -m prosparse_jax.main.sweep <command> --sweep=configs/sweeps/<file>.py:<arg>``.

Each defines ``get_config(arg)`` with the helpers of :mod:`prosparse_jax.sweeps.spec`.
"""
