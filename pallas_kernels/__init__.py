"""Pallas kernels for activation-sparse FFN decoding: ProSparse's operators (arXiv 2402.13516, §4.3).

* :mod:`pallas_kernels.reference` -- the contract: pure-jnp S2 (gate, activation, up projection of the active neurons
  -> x1) and S3 (down projection of the rows with a non-zero x1), and the input checks every kernel runs first.
* :mod:`pallas_kernels.sparse_ffn_triton` -- GPU, Pallas' Triton lowering: per-neuron masked row loads.
* :mod:`pallas_kernels.sparse_ffn_mosaic` -- TPU, Mosaic: scalar-prefetched active-index lists and per-row DMAs.

Both expose ``s2(x_BxD, w_gate_DxF, w_up_FxD, *, activation, threshold, tau, w_down_norms_F, ..., interpret)`` and
``s3(x1_BxF, w_down_FxD, ..., interpret)``, and are the ``pallas_triton`` / ``pallas_mosaic`` backends of
:func:`prosparse_jax.inference.sparse_ffn.sparse_ffn` (``implementation="auto"`` picks them on GPU / TPU). Tests run them with
``interpret=True`` on CPU against the references and lower them for ``cuda`` / ``tpu`` with ``jax.export``.
"""
