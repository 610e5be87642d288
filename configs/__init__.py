"""Experiment configs (ml_collections): ``--config=configs/<file>.py:<arg>``."""
