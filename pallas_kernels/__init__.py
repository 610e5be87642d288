"""Pallas kernels for activation-sparse FFN decoding: ProSparse's S2 and S3 (arXiv 2402.13516, §4.3).

``reference`` holds the pure-jnp contract and input checks; ``sparse_ffn_triton`` (GPU) and ``sparse_ffn_mosaic``
(TPU) are the ``pallas_triton`` / ``pallas_mosaic`` backends of ``prosparse_jax.inference.sparse_ffn``. Imports jax
and numpy only. See docs/kernels.md.
"""
