"""Downstream evaluation through lm-evaluation-harness in every sparse mode (docs/evaluation.md).

:mod:`~prosparse_jax.evaluation.modes` turns a mode string (``dense``, ``fatrelu:<t>``, ``thresholds:<file>``,
``topk:<k>``, ``predictor:<dir>``) into the model config and x1 hook it runs with; :mod:`~.backend` is the lm-eval
model ``prosparse``; :mod:`~.tasks` builds the offline tasks from the built-in corpus and checks local task files;
:mod:`~.report` runs several modes in one process and writes the JSON, the table and the figure.
"""
