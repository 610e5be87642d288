"""QUARANTINE: tests that reach into private jax APIs (``jax._src``).

The Triton IR of the CUDA export is read through a hook on ``jax._src.pallas.triton.lowering``, which jax may change
in any release: these tests run only on the jax versions they were checked with (``CHECKED_JAX``); on another
version they are skipped, and whoever upgrades jax rechecks the hook and extends the list. Keep every use of
``jax._src`` in this file.

What they check: the W_up / W_down row tiles the kernels load are masked Triton loads (dense in the norm-mode S2),
and each kernel's Triton module passes the verifier the GPU runs first.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest
from jax import export

from pallas_kernels import sparse_ffn_triton as triton_ffn
from pallas_kernels.sparse_ffn_triton import default_blocks
from prosparse_jax.inference.sparse_ffn import kernel_activation

CHECKED_JAX = ("0.10.",)
pytestmark = pytest.mark.skipif(not jax.__version__.startswith(CHECKED_JAX),
                                reason=f"jax._src hook checked on jax {CHECKED_JAX} only, not {jax.__version__}")

TRITON_CALL = "__gpu$xla.gpu.triton"


def _triton_modules(fn, *args, monkeypatch) -> list[str]:
    """The Triton IR (text) of every pallas_call in the CUDA export of ``fn``, each checked by the IR verifier."""
    from jax._src.pallas.triton import lowering as triton_lowering  # private

    modules, lower = [], triton_lowering.lower_jaxpr_to_triton_module

    def spy(*a, **kw):
        result = lower(*a, **kw)
        result.module.operation.verify()  # what the GPU's Triton checks first (an i1 loop bound once failed here)
        modules.append(result.module.operation.get_asm())
        return result

    monkeypatch.setattr(triton_lowering, "lower_jaxpr_to_triton_module", spy)
    export.export(jax.jit(fn), platforms=["cuda"],
                  disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON_CALL)])(*args)
    return modules


def _tile_loads_masked(triton_ir: str, rows: int, cols: int) -> list[bool]:
    """For each tt.load of a [rows, cols] tile in ``triton_ir``: does it take a mask (more than one operand)?"""
    masked = []
    for ln in triton_ir.splitlines():
        if "tt.load" in ln and f"tensor<{rows}x{cols}x!tt.ptr<" in ln:
            generic = re.search(r'"tt.load"\(([^)]*)\)', ln)  # "tt.load"(%p, %mask, %other) <{...}> : ...
            operands = generic.group(1) if generic else re.search(r"tt.load\s+([^:]*)", ln).group(1)  # tt.load %p, ..
            masked.append(operands.count("%") > 1)
    return masked


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("op", ["s2_relu", "s2_drelu", "s2_fatrelu", "s2_silu_norm", "s2_relu_fused", "s3"])
def test_row_tiles_are_masked_loads_at_llama2_7b_shape(op, dtype, monkeypatch):
    B, D, F = 4, 4096, 11008
    S = jax.ShapeDtypeStruct
    x, wg, w_FxD, x1 = S((B, D), dtype), S((D, F), dtype), S((F, D), dtype), S((B, F), dtype)
    scalar, norms = S((), jnp.float32), S((F,), jnp.float32)
    if op == "s3":
        irs = _triton_modules(triton_ffn.s3, x1, w_FxD, monkeypatch=monkeypatch)
    elif op == "s2_silu_norm":
        silu = kernel_activation("silu")
        irs = _triton_modules(lambda x, wg, wu, tau, n: triton_ffn.s2(x, wg, wu, activation=silu, tau=tau,
                                                                      w_down_norms_F=n),
                              x, wg, w_FxD, scalar, norms, monkeypatch=monkeypatch)
    else:
        name, _, gate = op.removeprefix("s2_").partition("_")
        act = kernel_activation(name)
        irs = _triton_modules(lambda x, wg, wu, t: triton_ffn.s2(x, wg, wu, activation=act, threshold=t,
                                                                 gate=gate or None),
                              x, wg, w_FxD, scalar, monkeypatch=monkeypatch)
    assert len(irs) == 1
    masked = _tile_loads_masked(irs[0], *default_blocks(F, D))  # [block_f, block_d] tiles of W_up or W_down rows
    assert masked
    assert not any(masked) if op == "s2_silu_norm" else all(masked)
