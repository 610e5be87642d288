r"""Permutes the FFN neurons of a checkpoint so that co-active ones sit together, and reports block sparsity.

    python -m prosparse_jax.main.permute --checkpoint=<workdir or HF folder> --out=<new workdir> \
        [--order=frequency|coactivation] [--data=stdlib] [--num_batches=4 --report_batches=4 --batch_size=8] \
        [--seq_len=... --step=N]

The permutation is exact (the permuted model computes the same function). The order is chosen on --num_batches
held-out batches and the block-sparsity report measured on --report_batches further ones (0: on the same ones,
in-sample). Writes ``<out>`` as a params-only workdir with ``<out>/permutation.json``; prints the report as one JSON
line. Details: :mod:`prosparse_jax.analysis.permute`.
"""

from __future__ import annotations

import sys

from absl import flags

from prosparse_jax.analysis.permute import ORDERS, permute, summary_line
from prosparse_jax.main import common


def _flags() -> flags.FlagValues:
    fv = flags.FlagValues()
    flags.DEFINE_string("checkpoint", None, "Workdir or HF model folder.", flag_values=fv)
    flags.DEFINE_string("out", None, "New (empty) workdir for the permuted model.", flag_values=fv)
    flags.DEFINE_string("order", "frequency", f"Neuron order: {' | '.join(ORDERS)}.", flag_values=fv)
    flags.DEFINE_string("data", "stdlib", "Data source: stdlib | files:<glob> | tfds:<name>.", flag_values=fv)
    flags.DEFINE_integer("num_batches", 4, "Held-out batches the order is chosen on.", flag_values=fv)
    flags.DEFINE_integer("report_batches", None, "Further held-out batches, disjoint from those, the block-sparsity "
                         "report is measured on; default: --num_batches; 0: report on the --num_batches batches "
                         "(in-sample).", flag_values=fv)
    flags.DEFINE_integer("batch_size", 8, "Sequences per batch.", flag_values=fv)
    flags.DEFINE_integer("seq_len", None, "Tokens per sequence; default: the run's data.seq_len, else 256.",
                         flag_values=fv)
    flags.DEFINE_integer("step", None, "Checkpoint step of a workdir; default: the latest.", flag_values=fv)
    flags.DEFINE_string("data_dir", None, "TFDS data dir; default: the run's data.data_dir.", flag_values=fv)
    flags.DEFINE_integer("cluster", 16, "coactivation: neurons per greedy cluster.", flag_values=fv)
    flags.DEFINE_integer("window", None, "coactivation: candidates per pick (the most frequent unassigned neurons); "
                         "default: --cluster.", flag_values=fv)
    flags.mark_flags_as_required(["checkpoint", "out"], flag_values=fv)
    return fv


def main(argv: list[str] | None = None) -> int:
    """Runs :func:`prosparse_jax.analysis.permute.permute`; returns the exit code."""
    fv = _flags()

    def body() -> str:
        return summary_line(permute(
            fv.checkpoint, fv.out, order=fv.order, data=fv.data, num_batches=fv.num_batches,
            report_batches=fv.report_batches, batch_size=fv.batch_size, seq_len=fv.seq_len, step=fv.step,
            data_dir=fv.data_dir, cluster=fv.cluster, window=fv.window))

    return common.run("permute", fv, argv, body, __doc__)


if __name__ == "__main__":
    sys.exit(main())
