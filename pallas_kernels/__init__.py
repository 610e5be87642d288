"""Sparse FFN Pallas kernels (upcoming issue).

Planned contract (ProSparse §4.3 sparse operators; TEAL; PowerInfer): each kernel lives next to its pure-jnp
reference in the same module and consumes the model's layout -- ``w_gate_DxF``/``w_up_DxF``/``w_down_FxD`` slices of
``params["layers"]`` and the x1 of ``prosparse_jax.model.ffn_hidden``, masked through the ``model.X1Mask`` hook -- so
that the model's FFN can dispatch to it. Tested with ``interpret=True`` on CPU; GPU lowering through Pallas' Triton
backend checked with ``jax.export``.
"""
