"""64-bit digests of array leaves, written with every checkpoint and verified on restore (:mod:`checkpoint`).

Per leaf: two position-weighted sums mod 2^32 of its fmix32-mixed 32-bit words. It detects damage, not tampering.
Small leaves are digested with numpy (no compile), big or multi-process ones by a jitted reduction where they live
(a sharded array is never gathered); both paths give the same value.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

DIGEST_ALGORITHM = "fmix32-poswsum-2x32-v1"
_MASK = 0xFFFFFFFF
_SEED_WORD, _SEED_POS = 0x9E3779B9, 0x7F4A7C15
_HOST_MAX_WORDS = 1 << 16  # jax leaves up to this many 32-bit words are digested with numpy, bigger ones by XLA
_HOST_BLOCK_WORDS = 1 << 22  # numpy works through a shard in blocks of about this many words


def _fmix32(h: Any, xp: Any) -> Any:
    """MurmurHash3's 32-bit finaliser (``xp``: numpy or jax.numpy): a bijection of uint32 mixing every bit."""
    h = h ^ (h >> xp.uint32(16))
    h = h * xp.uint32(0x85EBCA6B)
    h = h ^ (h >> xp.uint32(13))
    h = h * xp.uint32(0xC2B2AE35)
    return h ^ (h >> xp.uint32(16))


def _weights(pos: Any, xp: Any) -> tuple[Any, Any]:
    """The two odd weights of the words at flat positions ``pos`` (uint32): ``2 pos + 1`` and a hash of ``pos``."""
    return pos * xp.uint32(2) + xp.uint32(1), _fmix32(pos ^ xp.uint32(_SEED_POS), xp) | xp.uint32(1)


def _sums(words: Any, w1: Any, w2: Any, xp: Any) -> tuple[Any, Any]:
    """The two weighted sums (mod 2^32) of the mixed ``words`` with the position weights ``w1``, ``w2``.

    Odd weights and a bijective mix make any one changed word change both sums; changes of several words cancel in
    both with probability ~2^-64. Wrapping uint32 sums make the result independent of shards, blocks and reduction
    order.
    """
    v = _fmix32(words ^ xp.uint32(_SEED_WORD), xp)
    return xp.sum(v * w1, dtype=xp.uint32), xp.sum(v * w2, dtype=xp.uint32)


def _jnp_words(x: jax.Array) -> jax.Array:
    """The bits of ``x`` as uint32 words (1- and 2-byte elements zero-extended, 8-byte ones split in two)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    size = x.dtype.itemsize
    if size < 4:
        return jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * size}")).astype(jnp.uint32)
    return jax.lax.bitcast_convert_type(x, jnp.uint32)  # 8 bytes: a trailing axis of 2 words


def _np_words(a: np.ndarray) -> np.ndarray:
    """numpy twin of :func:`_jnp_words`."""
    flat = np.require(a, requirements="C").reshape(-1)
    size = a.dtype.itemsize
    if size < 4:
        return flat.view(np.dtype(f"uint{8 * size}")).astype(np.uint32).reshape(a.shape)
    if size == 4:
        return flat.view(np.uint32).reshape(a.shape)
    return flat.view(np.uint32).reshape(*a.shape, size // 4)


@jax.jit
def _device_digest(x: jax.Array) -> jax.Array:
    """uint32[2] of one leaf, computed where the array lives (a sharded array is reduced shard-wise, not gathered)."""
    w = _jnp_words(x)
    pos = jnp.zeros(w.shape, jnp.uint32)
    stride = 1
    for d in range(w.ndim - 1, -1, -1):  # the row-major flat index, without reshaping a sharded array
        pos = pos + jax.lax.broadcasted_iota(jnp.uint32, w.shape, d) * jnp.uint32(stride & _MASK)
        stride *= w.shape[d]
    return jnp.stack(_sums(w, *_weights(pos, jnp), jnp))


def _np_weights(gw: tuple[int, ...], first: tuple[int, ...], shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The position weights of the block of ``shape`` at ``first`` in a word array of global shape ``gw``."""
    strides = [int(np.prod(gw[d + 1:], dtype=np.uint64)) & _MASK for d in range(len(gw))]
    pos = np.zeros(shape, np.uint32)
    for d in range(len(shape)):
        idx = (np.arange(shape[d], dtype=np.uint64) + (first[d] & _MASK)) & _MASK
        pos = pos + ((idx * strides[d]) & _MASK).astype(np.uint32).reshape([-1 if e == d else 1
                                                                              for e in range(len(shape))])
    return _weights(pos, np)


def _host_digest(x: Any) -> tuple[int, int]:
    """:func:`_device_digest` with numpy, shard by shard and block by block, of a numpy or fully addressable array."""
    if isinstance(x, jax.Array):
        parts = [(s.index, np.asarray(s.data)) for s in x.addressable_shards if s.replica_id == 0]
        gshape = tuple(x.shape)
    else:
        a = np.asarray(x)
        parts, gshape = [((), a)], a.shape
    h1 = h2 = 0
    for index, a in parts:
        w = _np_words(a)
        gw = gshape + w.shape[a.ndim:]  # the global shape of the words
        if w.ndim == 0:  # a scalar: one word at position 0 (numpy scalars would warn about the wrapping products)
            w, gw = w.reshape(1), (1,)
        starts = [(sl.start or 0) for sl in index] + [0] * (w.ndim - len(index))
        rows = w.shape[0]
        step = max(1, _HOST_BLOCK_WORDS // max(1, w.size // max(rows, 1)))
        for r0 in range(0, rows, step):
            blk = w[r0:r0 + step]
            s1, s2 = _sums(blk, *_np_weights(gw, (starts[0] + r0, *starts[1:]), blk.shape), np)
            h1, h2 = h1 + int(s1), h2 + int(s2)
    return h1 & _MASK, h2 & _MASK


def _on_host(x: Any) -> bool:
    if not isinstance(x, jax.Array):
        return True
    if not x.is_fully_addressable or jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return False
    return x.size * max(1, x.dtype.itemsize // 4) <= _HOST_MAX_WORDS


def _leaf_name(path: Any) -> str:
    return jax.tree_util.keystr(path, simple=True, separator="/")


def digests(trees: dict[str, Any]) -> dict[str, dict[str, str]]:
    """``{item: {leaf path: 16 hex digits}}`` of the array leaves of each pytree in ``trees``.

    With several processes, all of them must call it.
    """
    out: dict[str, dict[str, Any]] = {}
    for item, tree in trees.items():
        out[item] = {}
        for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
            if not isinstance(x, (jax.Array, np.ndarray, np.generic)) or np.size(x) == 0:
                continue
            out[item][_leaf_name(path)] = _host_digest(x) if _on_host(x) else _device_digest(x)
    for leaves in out.values():  # the device digests were dispatched together; fetch them now
        for k, d in leaves.items():
            if isinstance(d, jax.Array):
                d = tuple(int(v) for v in np.asarray(d.addressable_shards[0].data))  # replicated
            leaves[k] = f"{d[0]:08x}{d[1]:08x}"
    return out
