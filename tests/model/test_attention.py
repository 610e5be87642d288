"""Attention backends (prosparse_jax.model.attention): each equals the reference on packed segments and GQA, the model
runs through the one config field, and the accelerator backends lower for their platform without the hardware.

Reference: ``xla_blocks`` (checked against a naive float64 loop here and against a naive model in test_model.py).
"""

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_config, tiny_model_config

from prosparse_jax.config import ModelConfig, base_config, resolve
from prosparse_jax.errors import ConfigError
from prosparse_jax.model import attention as attn
from prosparse_jax.model import transformer as model_lib
from prosparse_jax.model.transformer import cross_entropy, forward, init_params

ROOT = Path(__file__).resolve().parents[2]

#: float32 inputs, float32 scores and softmax everywhere (conftest sets the highest matmul precision): backends differ
#: only in the order of float32 sums over <= T = 384 keys and, for splash, in the online softmax's rescaling: a few
#: ulps (6e-8) x sqrt(T) ~ 1e-6 of the output scale (measured: <= 2e-7 for outputs, <= 7e-7 for gradients). 1e-5 of
#: max |reference| leaves a margin of > 10 and still fails on any masking error (one wrongly admitted or dropped key
#: moves outputs by O(1/T) ~ 3e-3).
F32_TOL = 1e-5

B, T, N, H = 2, 384, 4, 16  # T = 3 x 128: splash runs a 3 x 3 block grid (the causal corner skipped)
CPU_BACKENDS = ("xla", "splash")  # compared with xla_blocks; splash in Pallas TPU interpret mode


def _segments(T: int) -> np.ndarray:
    """Row 0: two documents then padding (id 0); row 1: padding between documents, a segment crossing blocks."""
    row0 = [1] * 150 + [2] * 200 + [0] * (T - 350)
    row1 = [5] * 100 + [0] * 20 + [7] * 7 + [9] * (T - 127)
    return np.array([row0, row1], np.int32)


def _qkv(K: int, T: int = T, seed: int = 0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, T, N, H)) * H**-0.5  # pre-scaled, as project_qkv hands them over
    k, v = rng.standard_normal((B, T, K, H)), rng.standard_normal((B, T, K, H))
    return tuple(jnp.asarray(a, dtype) for a in (q, k, v))


def _naive(q, k, v, seg):
    """float64 loop over heads: softmax over keys s <= t of the same segment."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    (_, Tq, Nq, _), K = q.shape, k.shape[2]
    allowed = np.tril(np.ones((Tq, Tq), bool))[None] & (seg[:, :, None] == seg[:, None, :])
    out = np.zeros_like(q)
    for n in range(Nq):
        s = np.einsum("bth,bsh->bts", q[:, :, n], k[:, :, n // (Nq // K)])
        s = np.where(allowed, s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        out[:, :, n] = np.einsum("bts,bsh->bth", p / p.sum(-1, keepdims=True), v[:, :, n // (Nq // K)])
    return out


def _assert_close(got, want, tol=F32_TOL, what=""):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape and np.all(np.isfinite(got))
    scale = float(np.max(np.abs(want)))
    err = float(np.max(np.abs(got - want)))
    assert err <= tol * scale, f"{what}: max|diff| = {err:.3g} > {tol} x {scale:.3g}"


def _attention(q, k, v, seg=None, *, implementation, interpret=False):
    """Causal self-attention of one layer as the model runs it: the backend's mask, then the attention."""
    B, T = q.shape[:2]
    mask = attn.prepare(implementation, seg, B, T, dtype=q.dtype)
    return attn.attend(q, k, v, mask, interpret=interpret)


def _value_and_vjp(implementation, q, k, v, seg, **kw):
    f = jax.jit(lambda q, k, v: _attention(q, k, v, seg, implementation=implementation, **kw))
    out, vjp = jax.vjp(f, q, k, v)
    ct = jnp.asarray(np.random.default_rng(1).standard_normal(out.shape), out.dtype)
    return out, vjp(ct)


# ---------------------------------------------------------------------------------------------------------------
# Numerics
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("K", [4, 2, 1])  # MHA, GQA, MQA
def test_reference_equals_naive_attention_on_packed_segments(K):
    q, k, v = _qkv(K)
    seg = _segments(T)
    f = jax.jit(lambda q, k, v, seg: _attention(q, k, v, seg, implementation="xla_blocks"))
    _assert_close(f(q, k, v, jnp.asarray(seg)), _naive(q, k, v, seg), what="xla_blocks vs naive")


@pytest.mark.parametrize("K", [4, 2])
@pytest.mark.parametrize("implementation", CPU_BACKENDS)
def test_backend_equals_reference_with_packing_and_gqa(implementation, K):
    q, k, v = _qkv(K)
    seg = jnp.asarray(_segments(T))
    kw = {"interpret": True} if implementation == "splash" else {}
    out, grads = _value_and_vjp(implementation, q, k, v, seg, **kw)
    ref_out, ref_grads = _value_and_vjp("xla_blocks", q, k, v, seg)
    _assert_close(out, ref_out, what=f"{implementation} output")
    for name, g, g_ref in zip("qkv", grads, ref_grads, strict=True):
        _assert_close(g, g_ref, what=f"{implementation} d{name}")


@pytest.mark.parametrize("implementation", CPU_BACKENDS)
def test_backend_equals_reference_without_segments(implementation):
    q, k, v = _qkv(K=1, T=128, seed=3)
    kw = {"interpret": True} if implementation == "splash" else {}
    want = _attention(q, k, v, implementation="xla_blocks")
    _assert_close(_attention(q, k, v, implementation=implementation, **kw), want, what=implementation)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs a GPU")
@pytest.mark.parametrize("K", [4, 2])
def test_cudnn_on_gpu_is_as_close_to_float32_as_xla_blocks_in_bf16(K):
    """On a GPU, cuDNN's fused attention (bf16, packed segments, GQA) against the float32 reference: its output and
    gradients are no further from it than xla_blocks run in bf16 on the same inputs, times 2 (cuDNN rounds P to bf16
    before P @ V; a masking error moves outputs by O(1/T) of their scale, far beyond either)."""
    q, k, v = _qkv(K, dtype=jnp.bfloat16)
    seg = jnp.asarray(_segments(T))
    ref_out, ref_grads = _value_and_vjp("xla_blocks", *(a.astype(jnp.float32) for a in (q, k, v)), seg)
    for got, ours, want, what in zip((*_value_and_vjp("cudnn", q, k, v, seg),),
                                     (*_value_and_vjp("xla_blocks", q, k, v, seg),), (ref_out, ref_grads),
                                     ("output", "grads"), strict=True):
        for g, o, w in zip(jax.tree.leaves(got), jax.tree.leaves(ours), jax.tree.leaves(want), strict=True):
            w64 = np.asarray(w, np.float64)
            err_ours = float(np.max(np.abs(np.asarray(o.astype(jnp.float32), np.float64) - w64)))
            err_cudnn = float(np.max(np.abs(np.asarray(g.astype(jnp.float32), np.float64) - w64)))
            assert err_cudnn <= 2 * err_ours + 1e-3 * float(np.max(np.abs(w64))), (what, err_cudnn, err_ours)


def test_forward_with_xla_equals_xla_blocks_logits_and_grads():
    cfg = tiny_model_config(activation="relu", n_heads=4, n_kv_heads=2, attention="xla_blocks")
    params = init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 24)), jnp.int32)
    seg = jnp.asarray([[1] * 10 + [2] * 11 + [0] * 3, [4] * 24], jnp.int32)
    pos = jnp.asarray([list(range(10)) + list(range(11)) + [0] * 3, list(range(24))], jnp.int32)

    def loss(p, c):
        logits, _ = forward(p, ids, c, segment_ids_BxT=seg, positions_BxT=pos)
        return cross_entropy(logits, jnp.roll(ids, -1, axis=1), (seg != 0).astype(jnp.float32)), logits

    grad_fn = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
    (l_ref, logits_ref), g_ref = grad_fn(params, cfg)
    (l_xla, logits_xla), g_xla = grad_fn(params, cfg.replace(attention="xla"))
    _assert_close(logits_xla, logits_ref, what="logits")
    np.testing.assert_allclose(l_xla, l_ref, rtol=F32_TOL)
    for path, a in jax.tree_util.tree_leaves_with_path(g_xla):
        b = g_ref
        for key in path:
            b = b[key.key]
        _assert_close(a, b, what=jax.tree_util.keystr(path))


def _can_run(name, platform, dtype, T):
    """Whether backend ``name`` compiles and runs inputs of ``dtype`` and length T on ``platform``."""
    if name == "cudnn":
        return platform == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
    if name == "splash":
        return platform == "tpu" and T % attn.SPLASH_LANES == 0
    return True  # xla_blocks and xla: plain XLA


@pytest.mark.parametrize("platform", ["cpu", "gpu", "tpu"])
def test_auto_picks_a_backend_that_runs_there_and_the_fused_kernel_when_it_can(platform):
    fused = {"gpu": "cudnn", "tpu": "splash"}.get(platform)
    for dtype in (jnp.float32, jnp.bfloat16, jnp.float16):
        for T in (100, 128, 4096):
            name = attn.resolve_implementation("auto", platform=platform, dtype=dtype, seq_len=T)
            assert _can_run(name, platform, dtype, T), (platform, dtype, T, name)
            if fused and _can_run(fused, platform, dtype, T):
                assert name == fused, (platform, dtype, T, name)
    for name in attn.IMPLEMENTATIONS:  # a named backend is never replaced
        assert attn.resolve_implementation(name, platform=platform) == name


# ---------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------
def test_unknown_attention_name_is_a_config_error_with_suggestions():
    with pytest.raises(ConfigError, match=r"model\.attention: .*'splsh'.*did you mean 'splash'.*choose one of: auto, "
                                          r"xla_blocks, xla, cudnn, splash"):
        tiny_model_config(attention="splsh")
    c = base_config()
    c.model.attention = "cudnn"  # float32 by default
    with pytest.raises(ConfigError, match=r"model\.attention: 'cudnn'.*float32.*model\.dtype='bfloat16'"):
        resolve(c)
    with pytest.raises(ValueError, match=r"unknown attention implementation 'flash'.*choose one of"):
        _attention(*_qkv(K=2, T=8), implementation="flash")


def test_backends_that_cannot_run_the_inputs_say_what_to_use_instead():
    q, k, v = _qkv(K=2, T=100)
    with pytest.raises(ConfigError, match=r"'splash' needs a sequence length that is a multiple of 128.*T=100.*"
                                          r"data\.seq_len.*'xla'"):
        _attention(q, k, v, implementation="splash", interpret=True)
    with pytest.raises(ConfigError, match=r"'cudnn'.*bfloat16 or float16, got float32.*model\.attention='xla'"):
        _attention(q, k, v, implementation="cudnn")
    # a CPU-only jax has no cuDNN: refused when traced, naming the backends that run here
    with pytest.raises(ConfigError, match=r"'cudnn' cannot run this: cuDNN is not detected.*'xla'.*'auto'"):
        _attention(*(a.astype(jnp.bfloat16) for a in (q, k, v)), implementation="cudnn")
    # decoding (fewer queries than keys in the cache) is xla_blocks' job
    mask = attn.prepare("xla", None, B, 1)
    with pytest.raises(ValueError, match=r"'xla' is causal self-attention.*T=1.*S=100.*'xla_blocks'"):
        attn.attend(q[:, :1], k, v, mask)


# ---------------------------------------------------------------------------------------------------------------
# Lowering for the accelerators (jax.export from this CPU host; nothing is allocated)
# ---------------------------------------------------------------------------------------------------------------
CUDNN_CALLS = ("__cudnn$fmhaScaleBiasSoftmax", "__cudnn$fmhaScaleBiasSoftmaxBackward")

# ---- QUARANTINE: a patch of private JAX API (jax._src), valid for the jax version it was written against. On another
# version the tests that use it skip until the patch is checked again and the version below updated.
PRIVATE_API_JAX_VERSION = "0.10.2"
private_jax_api = pytest.mark.skipif(
    jax.__version__ != PRIVATE_API_JAX_VERSION,
    reason=f"patches jax._src as of jax {PRIVATE_API_JAX_VERSION}; check the patch against jax {jax.__version__}")


@pytest.fixture
def cudnn_version_answered(monkeypatch):
    """Tracing the cudnn backend asks the local jax build for its cuDNN version (a CPU-only jaxlib has none: 'cuDNN
    is not detected'); the lowering itself is the CUDA platform's and needs no GPU. Answers with cuDNN 9.8 (used only
    for feature checks; the compute-capability checks see no GPU and apply the pre-Hopper limits)."""
    from jax._src.cudnn import fused_attention_stablehlo

    monkeypatch.setattr(fused_attention_stablehlo, "check_cudnn_version", lambda: 90800)
# ---- end of QUARANTINE


def _export_loss_and_grads(cfg: ModelConfig, platform: str, T: int, batch: int = 2, disabled=()) -> str:
    """StableHLO text of value_and_grad of the LM loss (the train step's core) exported for ``platform``."""
    def loss(params, ids, seg, pos):
        logits, _ = forward(params, ids, cfg, segment_ids_BxT=seg, positions_BxT=pos)
        return cross_entropy(logits, ids, (seg != 0).astype(jnp.float32))

    ints = jax.ShapeDtypeStruct((batch, T), jnp.int32)
    exported = jax.export.export(jax.jit(jax.value_and_grad(loss)), platforms=[platform],
                                 disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(c) for c in disabled])(
        model_lib.abstract_params(cfg), ints, ints, ints)
    return exported.mlir_module()


def _custom_calls(text: str) -> list[str]:
    return re.findall(r"stablehlo\.custom_call @([\w$.]+)", text)


@private_jax_api
def test_forward_and_grads_lower_for_cuda_with_cudnn(cudnn_version_answered):
    cfg = tiny_model_config(d_model=128, n_heads=4, n_kv_heads=2, dtype="bfloat16", attention="cudnn")
    calls = _custom_calls(_export_loss_and_grads(cfg, "cuda", T=64, disabled=CUDNN_CALLS))
    assert calls.count(CUDNN_CALLS[0]) == 1 and calls.count(CUDNN_CALLS[1]) == 1  # one layer body under lax.scan


def test_forward_and_grads_lower_for_tpu_with_splash():
    cfg = tiny_model_config(d_model=256, n_heads=4, n_kv_heads=2, attention="splash")  # head_dim 64, GQA
    calls = _custom_calls(_export_loss_and_grads(cfg, "tpu", T=256))
    assert calls.count("tpu_custom_call") == 3  # splash forward, dq and dkv kernels (one layer body under lax.scan)


SPLASH_ON_A_MESH = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
from prosparse_jax.model import attention as attn
jax.config.update("jax_default_matmul_precision", "highest")
mesh = jax.make_mesh((1, 2), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
rows = NamedSharding(mesh, P(("data", "fsdp")))
B, T, N, K, H = 2, 256, 4, 2, 64
def f(q, k, v, seg, implementation, interpret=False):
    mask = attn.prepare(implementation, seg, *seg.shape, dtype=q.dtype)
    return attn.attend(q, k, v, mask, interpret=interpret)
args = [jax.ShapeDtypeStruct(s, d, sharding=rows) for s, d in
        [((B, T, N, H), jnp.bfloat16), ((B, T, K, H), jnp.bfloat16), ((B, T, K, H), jnp.bfloat16), ((B, T), jnp.int32)]]
try:
    jax.export.export(jax.jit(f, static_argnums=4), platforms=["tpu"])(*args, "splash")
    print("without the mesh in context: lowered")
except NotImplementedError as e:
    print("without the mesh in context:", e)
with jax.set_mesh(mesh):
    text = jax.export.export(jax.jit(f, static_argnums=4), platforms=["tpu"])(*args, "splash").mlir_module()
print("with the mesh: tpu_custom_call x", text.count("stablehlo.custom_call @tpu_custom_call"))
rng = np.random.default_rng(0)
q, k, v = (jax.device_put(jnp.asarray(rng.standard_normal(a.shape) / 8, jnp.float32), rows) for a in args[:3])
seg = jax.device_put(jnp.asarray(np.repeat([[1, 2], [3, 0]], T // 2, axis=1), jnp.int32), rows)
with jax.set_mesh(mesh):
    got = jax.jit(f, static_argnums=(4, 5))(q, k, v, seg, "splash", True)
want = f(q, k, v, seg, "xla_blocks")
print("max rel diff", float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want))))
"""


def test_splash_splits_the_batch_over_the_mesh_in_context():
    """Mosaic kernels are not partitioned automatically: on a 2-device mesh the export fails without the mesh in
    context and lowers with it (shard_map over the batch); the sharded interpret run equals the reference."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(SPLASH_ON_A_MESH)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "without the mesh in context: Mosaic kernels cannot be automatically partitioned" in out.stdout
    assert "with the mesh: tpu_custom_call x 1" in out.stdout
    rel = float(re.search(r"max rel diff (\S+)", out.stdout).group(1))
    assert rel <= F32_TOL, out.stdout


# ---------------------------------------------------------------------------------------------------------------
# The train step of a paper-scale model, lowered for each accelerator
# ---------------------------------------------------------------------------------------------------------------
def _export_train_step(config_arg: str, attention: str, platform: str, micro_batch: int, disabled=()) -> str:
    """jax.export of exactly the jitted step train.py runs (abstract state and batch: nothing allocated)."""
    import optax  # noqa: F401 - the optimizer state's types

    from prosparse_jax.training import optim as optim_lib
    from prosparse_jax.training import schedules
    from prosparse_jax.training.step import make_train_step

    rc = resolve(load_config(f"configs/sparsing_law.py:{config_arg}", f"--config.model.attention={attention}"))
    tx, lr_fn = optim_lib.make_optimizer(rc.optim, rc.train.steps, rc.model.d_model)
    step = make_train_step(rc, tx, lr_fn, schedules.reg_factor_schedule(rc.sparsity.stages))
    params = model_lib.abstract_params(rc.model)
    state = {"params": params, "opt_state": jax.eval_shape(tx.init, params),
             "step": jax.ShapeDtypeStruct((), jnp.int32)}
    shape = (1, micro_batch, rc.data.seq_len)
    batch = {k: jax.ShapeDtypeStruct(shape, dt) for k, dt in (("inputs", jnp.int32), ("targets", jnp.int32),
             ("segment_ids", jnp.int32), ("positions", jnp.int32), ("weights", jnp.float32))}
    exported = jax.export.export(jax.jit(step, donate_argnums=0), platforms=[platform],
                                 disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(c) for c in disabled])
    return exported(state, batch).mlir_module()


@pytest.mark.parametrize(("attention", "platform"),
                         [pytest.param("cudnn", "cuda", marks=private_jax_api), ("splash", "tpu")])
def test_paper_scale_train_step_lowers(attention, platform, request):
    """Sparsing Law 1.2B (MiniCPM, 32 layers, d 1792, 14 heads of 128, T = 4096, bfloat16, remat): the train step
    with the accelerator's attention lowers for its platform (per-device micro-batch 4). The layers run under
    lax.scan, so each kernel appears once per use in the layer body; remat runs the forward kernel twice."""
    if attention == "cudnn":
        request.getfixturevalue("cudnn_version_answered")
    calls = _custom_calls(_export_train_step("1.2b-relu", attention, platform, micro_batch=4, disabled=CUDNN_CALLS))
    if attention == "cudnn":
        assert calls.count(CUDNN_CALLS[0]) == 2 and calls.count(CUDNN_CALLS[1]) == 1
    else:
        assert calls.count("tpu_custom_call") == 4  # forward x 2, dq, dkv
