"""Pallas kernels for activation-sparse FFN decoding: ProSparse's operators S2 and S3 (arXiv 2402.13516, §4.3).

:mod:`~pallas_kernels.reference` holds the contract (pure-jnp S2 / S3, input checks); ``sparse_ffn_triton`` (GPU)
and ``sparse_ffn_mosaic`` (TPU) are the ``pallas_triton`` / ``pallas_mosaic`` backends of
``prosparse_jax.inference.sparse_ffn``. This package imports jax and numpy only.
"""
