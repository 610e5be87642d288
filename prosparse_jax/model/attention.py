"""Causal self-attention over packed sequences: one interface, one backend per platform (table: docs/model.md).

:func:`prepare` builds the mask once per forward pass in its backend's form; :func:`attend` runs a layer with it. Every
backend computes the same function: query t attends key s iff s <= t and segment_ids[s] == segment_ids[t] (id 0 =
padding, a segment of its own, so no row is empty); q arrives scaled by H^-0.5; query head n reads kv head n // (N / K);
scores and softmax in float32, probabilities cast to the input dtype for the product with v. Only ``xla_blocks``
attends over a KV cache.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from prosparse_jax.errors import ConfigError, did_you_mean

Array = jax.Array
BiasBlocks = list[tuple[int, int, Array]]

NEG_INF = -1e30  # additive bias of a masked score (xla_blocks)
ATTN_BLOCK = 64  # query rows per block of xla_blocks; key blocks above the diagonal are never computed
SPLASH_LANES = 128  # splash: T and its blocks are multiples of the TPU lane width


class Mask(NamedTuple):
    """What every layer's attention reads (:func:`prepare`): a resolved backend name and its form of the mask, ``data``:
    bias blocks (xla_blocks), the same-segment mask [B, 1, T, T] or None (xla, cudnn), segment ids or None (splash)."""

    implementation: str
    data: Any


class Implementation(NamedTuple):
    """A backend: ``prepare(segment_ids_BxT, B, T, block) -> data`` and
    ``attend(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, data, interpret) -> o_BxTxNxH``."""

    prepare: Callable[[Array | None, int, int, int], Any]
    attend: Callable[[Array, Array, Array, Any, bool], Array]


# ---------------------------------------------------------------------------------------------------------------
# xla_blocks: the CPU-tuned block-causal attention (also decoding over a KV cache)
# ---------------------------------------------------------------------------------------------------------------
def bias_blocks(segment_ids_BxT: Array | None, B: int, T: int, block: int = ATTN_BLOCK) -> BiasBlocks:
    """Causal (and same-segment) additive attention bias, per block of query rows.

    Returns ``[(t0, t1, bias_Bx(t1-t0)xt1)]``: rows t0..t1-1 attend keys 0..t1-1 only (later keys are causally masked
    for every row of the block, so they are skipped, not masked); the bias is 0 where attention is allowed and
    :data:`NEG_INF` elsewhere (same values as a select since |score| << ulp(1e30), and its gradient is the identity).
    """
    blocks = []
    for t0 in range(0, T, block):
        t1 = min(T, t0 + block)
        allowed_BxtxS = jnp.broadcast_to(jnp.arange(t0, t1)[:, None] >= jnp.arange(t1)[None, :], (B, t1 - t0, t1))
        if segment_ids_BxT is not None:
            allowed_BxtxS = allowed_BxtxS & (segment_ids_BxT[:, t0:t1, None] == segment_ids_BxT[:, None, :t1])
        blocks.append((t0, t1, jnp.where(allowed_BxtxS, 0.0, NEG_INF).astype(jnp.float32)))
    return blocks


def _xla_blocks(q_BxTxNxH: Array, k_BxSxKxH: Array, v_BxSxKxH: Array, blocks: BiasBlocks, interpret: bool) -> Array:
    """Query rows t0..t1-1 of each block meet the first ``bias.shape[-1]`` keys (t1 in training; the whole KV cache
    when decoding). The G query heads of a kv head are folded into the query axis ([B, K, T*G, H]), so MHA and GQA run
    the same [B, K]-batched matmuls."""
    del interpret
    (B, T, N, H), dt, K = q_BxTxNxH.shape, q_BxTxNxH.dtype, k_BxSxKxH.shape[2]
    G = N // K
    # query index q = t * G + g
    q_BxKxQxH = q_BxTxNxH.reshape(B, T, K, G, H).transpose(0, 2, 1, 3, 4).reshape(B, K, T * G, H)
    k_BxKxSxH = k_BxSxKxH.transpose(0, 2, 1, 3)
    v_BxKxSxH = v_BxSxKxH.transpose(0, 2, 1, 3)
    outs = []
    for t0, t1, bias_BxtxS in blocks:
        n, s = t1 - t0, bias_BxtxS.shape[-1]
        s_BxKxqxS = jnp.einsum("bkqh,bksh->bkqs", q_BxKxQxH[:, :, t0 * G:t1 * G], k_BxKxSxH[:, :, :s],
                               preferred_element_type=jnp.float32)
        s_BxKxqxS = (s_BxKxqxS.reshape(B, K, n, G, s) + bias_BxtxS[:, None, :, None, :]).reshape(B, K, n * G, s)
        p_BxKxqxS = jax.nn.softmax(s_BxKxqxS, axis=-1).astype(dt)
        outs.append(jnp.einsum("bkqs,bksh->bkqh", p_BxKxqxS, v_BxKxSxH[:, :, :s]))
    o_BxKxQxH = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=2)
    return o_BxKxQxH.reshape(B, K, T, G, H).transpose(0, 2, 1, 3, 4).reshape(B, T, N, H)


# ---------------------------------------------------------------------------------------------------------------
# jax.nn.dot_product_attention: xla and cudnn
# ---------------------------------------------------------------------------------------------------------------
def same_segment_mask(segment_ids_BxT: Array | None, B: int, T: int, block: int) -> Array | None:
    """[B, 1, T, T] bool, True where query and key share a segment (the causal part is ``is_causal``)."""
    del B, T, block
    if segment_ids_BxT is None:
        return None
    return segment_ids_BxT[:, None, :, None] == segment_ids_BxT[:, None, None, :]


def _xla(q_BxTxNxH: Array, k_BxTxKxH: Array, v_BxTxKxH: Array, mask_Bx1xTxT: Array | None,
         interpret: bool) -> Array:
    del interpret
    return jax.nn.dot_product_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, mask=mask_Bx1xTxT, scale=1.0,
                                        is_causal=True, implementation="xla")


def _cudnn(q_BxTxNxH: Array, k_BxTxKxH: Array, v_BxTxKxH: Array, mask_Bx1xTxT: Array | None,
           interpret: bool) -> Array:
    """cuDNN flash attention (CUDA GPUs, a CUDA build of jax): bfloat16 / float16 only, head_dim a multiple of 8 and
    <= 128 (<= 256 from Hopper on). Segments arrive as the [B, 1, T, T] mask, which cuDNN takes as an additive bias."""
    del interpret
    if q_BxTxNxH.dtype not in (jnp.bfloat16, jnp.float16):
        raise ConfigError(f"attention 'cudnn': cuDNN flash attention takes bfloat16 or float16, got "
                         f"{q_BxTxNxH.dtype}; set model.dtype='bfloat16', or model.attention='xla' for float32")
    try:
        return jax.nn.dot_product_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, mask=mask_Bx1xTxT, scale=1.0,
                                            is_causal=True, implementation="cudnn")
    except (RuntimeError, NotImplementedError) as e:  # no cuDNN in this jax build, or a shape cuDNN refuses
        raise ConfigError(f"attention 'cudnn' cannot run this: {e}. Use model.attention='xla' (any platform) or "
                         "'auto'") from e


# ---------------------------------------------------------------------------------------------------------------
# splash: Pallas TPU splash attention
# ---------------------------------------------------------------------------------------------------------------
def _segment_ids(segment_ids_BxT: Array | None, B: int, T: int, block: int) -> Array | None:
    del B, T, block
    return segment_ids_BxT


def _splash(q_BxTxNxH: Array, k_BxTxKxH: Array, v_BxTxKxH: Array, segment_ids_BxT: Array | None,
            interpret: bool) -> Array:
    """Pallas TPU splash attention (GQA and segment ids native), vmapped over the batch; ``interpret`` runs it on a CPU.
    Under a mesh context (``jax.set_mesh``) the batch is split over every mesh axis with ``shard_map``: Mosaic kernels
    cannot be partitioned automatically."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa  # Pallas TPU: imported when used

    B, T, N, _ = q_BxTxNxH.shape
    if T % SPLASH_LANES:
        raise ConfigError(f"attention 'splash' needs a sequence length that is a multiple of {SPLASH_LANES} (the TPU "
                         f"lane width), got T={T}; set data.seq_len to one, or model.attention='xla'")
    b = next(b for b in (512, 256, 128) if T % b == 0)
    sizes = sa.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                          block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
    kernel = sa.make_splash_mha(sa.MultiHeadMask([sa.CausalMask((T, T))] * N), block_sizes=sizes, head_shards=1,
                                q_seq_shards=1, interpret=interpret)

    def per_example(q_TxNxH: Array, k_TxKxH: Array, v_TxKxH: Array, *seg_T: Array) -> Array:
        segments = sa.SegmentIds(seg_T[0], seg_T[0]) if seg_T else None
        o_NxTxH = kernel(q_TxNxH.transpose(1, 0, 2), k_TxKxH.transpose(1, 0, 2), v_TxKxH.transpose(1, 0, 2),
                         segments)
        return o_NxTxH.transpose(1, 0, 2)

    args = (q_BxTxNxH, k_BxTxKxH, v_BxTxKxH) + (() if segment_ids_BxT is None else (segment_ids_BxT,))
    batched = jax.vmap(per_example)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return batched(*args)
    if B % mesh.size:
        raise ConfigError(f"attention 'splash' splits the batch over the {mesh.size} devices of the mesh "
                         f"{dict(mesh.shape)}, but the (micro-)batch is {B}; make it a multiple of {mesh.size}")
    spec = PartitionSpec(mesh.axis_names)  # the batch over every mesh axis (data x fsdp), heads and T whole
    return jax.shard_map(batched, in_specs=(spec,) * len(args), out_specs=spec, check_vma=False)(*args)


# ---------------------------------------------------------------------------------------------------------------
# The interface
# ---------------------------------------------------------------------------------------------------------------
IMPLEMENTATIONS: dict[str, Implementation] = {
    "xla_blocks": Implementation(bias_blocks, _xla_blocks),
    "xla": Implementation(same_segment_mask, _xla),
    "cudnn": Implementation(same_segment_mask, _cudnn),
    "splash": Implementation(_segment_ids, _splash),
}
NAMES = ("auto", *IMPLEMENTATIONS)  # what ``model.attention`` accepts


def resolve_implementation(implementation: str, *, dtype: Any = jnp.float32, seq_len: int = 0,
                           platform: str | None = None) -> str:
    """A key of :data:`IMPLEMENTATIONS`: ``implementation``, or what ``auto`` means on ``platform`` for inputs of
    ``dtype`` and length ``seq_len``; ValueError on an unknown name. ``platform`` defaults to the host that traces:
    name the backend when exporting for another platform.
    """
    if implementation == "auto":
        platform = platform or jax.default_backend()
        if platform in ("gpu", "cuda"):
            return "cudnn" if jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) else "xla"
        if platform == "tpu":
            return "splash" if seq_len % SPLASH_LANES == 0 else "xla"
        return "xla_blocks"
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {implementation!r}"
                         f"{did_you_mean(str(implementation), NAMES)}; choose one of: "
                         f"{', '.join(NAMES)}")
    return implementation


def prepare(implementation: str, segment_ids_BxT: Array | None, B: int, T: int, *, dtype: Any = jnp.float32,
            block: int = ATTN_BLOCK) -> Mask:
    """The mask every layer of one forward pass reads, in the form of ``implementation`` (``auto`` resolved).

    Args:
      segment_ids_BxT: packed-sequence ids (0 = padding), or None for one sequence per row.
      dtype: dtype of q, k and v (``auto`` on GPU picks by it).
      block: xla_blocks' query rows per block.
    """
    name = resolve_implementation(implementation, dtype=dtype, seq_len=T)
    return Mask(name, IMPLEMENTATIONS[name].prepare(segment_ids_BxT, B, T, block))


def attend(q_BxTxNxH: Array, k_BxSxKxH: Array, v_BxSxKxH: Array, mask: Mask | BiasBlocks, *,
           interpret: bool = False) -> Array:
    """Attention output [B, T, N, H] of (pre-scaled) queries over keys and values with K heads (K divides N).

    ``mask`` comes from :func:`prepare`; a plain list of bias blocks (:func:`bias_blocks`, or a decoder's over its
    KV cache, where S may exceed T) runs ``xla_blocks``. ``interpret`` runs a Pallas kernel (splash) in interpret
    mode; the other backends ignore it.
    """
    if not isinstance(mask, Mask):
        mask = Mask("xla_blocks", mask)
    T, S = q_BxTxNxH.shape[1], k_BxSxKxH.shape[1]
    if mask.implementation != "xla_blocks" and S != T:
        raise ValueError(f"attention {mask.implementation!r} is causal self-attention (as many keys as queries), got "
                         f"T={T} queries and S={S} keys; attention over a KV cache runs 'xla_blocks'")
    return IMPLEMENTATIONS[mask.implementation].attend(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask.data, interpret)

