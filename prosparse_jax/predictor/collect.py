"""What a predictor learns from: per layer, the FFN input after its RMSNorm and the set of neurons the frozen model
computes, captured batch by batch from the model's own layers (no cache: one batch of activations at a time).

The active set is what the model's forward leaves non-zero, ``x1 != 0`` under its config: act(gate) > 0 for ReLU /
ReLU², gate >= t for FATReLU(t), dReLU's joint rule (relu(gate) * relu(up) != 0), and, for a model in the CETT sparse
mode (``cfg.neuron_thresholds``), the neurons that mode keeps (|x1_i| * ||W_down[i]|| > tau_l). Every layer sees the
unmasked output of the layers below it (the model as it runs without a predictor).

Data: training batches come from the run's training split (:func:`train_iterator`, resumable), held-out ones from its
eval split (:func:`eval_batches`): a predictor is never trained on the data it is calibrated or measured on.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from prosparse_jax.config import DataConfig, ModelConfig
from prosparse_jax.data import corpus as corpus_lib
from prosparse_jax.data import pipeline as data_lib
from prosparse_jax.errors import InputError
from prosparse_jax.model import attention as attention_lib
from prosparse_jax.model import transformer as model
from prosparse_jax.model.transformer import Params

Batch = dict[str, Any]
# (params, batch) -> (x_LxMxD float32, active_LxMxF bool, valid_M bool), M = B * T tokens of the batch
Collect = Callable[[Params, Batch], tuple[jax.Array, jax.Array, jax.Array]]


def make_collect(cfg: ModelConfig) -> Collect:
    """Jitted (params, batch) -> (FFN inputs x_LxMxD, active sets active_LxMxF, valid_M) of one batch (see module)."""

    def f(params: Params, batch: Batch) -> tuple[jax.Array, jax.Array, jax.Array]:
        ids_BxT, seg_BxT, pos_BxT = batch["inputs"], batch["segment_ids"], batch["positions"]
        B, T = ids_BxT.shape
        valid_BxT = seg_BxT != 0
        mask = attention_lib.prepare(cfg.attention, seg_BxT, B, T, dtype=jnp.dtype(cfg.dtype))
        rope_cs = model.rope_tables(pos_BxT, cfg.head_dim, cfg.rope_theta)
        x1_mask = model.sparse_mode_mask(params, cfg)

        def attend(q_BxTxNxH: jax.Array, k_BxTxKxH: jax.Array, v_BxTxKxH: jax.Array) -> tuple[jax.Array, tuple[()]]:
            return attention_lib.attend(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, mask), ()

        def layer(h_BxTxD: jax.Array, lp: Params, i: jax.Array, _: Any) -> tuple[jax.Array, Any]:
            def ffn(x_BxTxD: jax.Array, lp: Params) -> tuple[jax.Array, Any]:
                out_BxTxD, x1_BxTxF, _ = model.gated_ffn(x_BxTxD, lp, i, valid_BxT, cfg, x1_mask)
                return out_BxTxD, (x_BxTxD.reshape(B * T, -1).astype(jnp.float32), (x1_BxTxF != 0).reshape(B * T, -1))

            h_BxTxD, (_, aux) = model.decoder_block(h_BxTxD, lp, rope_cs, attend, ffn, cfg)
            return h_BxTxD, aux

        _, (x_LxMxD, active_LxMxF) = model.run_layers(params, model.embed(params, ids_BxT, cfg), layer)
        return x_LxMxD, active_LxMxF, valid_BxT.reshape(-1)

    return jax.jit(f)


def bytes_per_token(cfg: ModelConfig) -> int:
    """Device bytes one token of a collected batch takes (float32 x and bool active set of every layer)."""
    return cfg.n_layers * (4 * cfg.d_model + cfg.d_ff)


# ---------------------------------------------------------------------------------------------------------------
# The run's data
# ---------------------------------------------------------------------------------------------------------------
def open_data(dcfg: DataConfig, tok_path: Path | None, vocab: int) -> tuple[corpus_lib.Corpus, Any]:
    """(corpus, tokenizer) of ``dcfg`` with the model's tokenizer.json ``tok_path``.

    Raises:
      InputError: no tokenizer, or one larger than the model's vocabulary ``vocab``.
    """
    if tok_path is None:
        raise InputError("checkpoint: no tokenizer.json next to its config.json; the predictor needs the model's "
                         "tokenizer to read the training data")
    return corpus_lib.open_corpus(dcfg), corpus_lib.load_model_tokenizer(tok_path, vocab)


def train_iterator(corpus: corpus_lib.Corpus, tok: Any, dcfg: DataConfig, *, batch_size: int, seed: int
                   ) -> data_lib.TrainIterator:
    """Training-split batches, forever, resumable (``get_state`` / ``set_state``)."""
    return data_lib.make_train_iterator(corpus, tok, seq_len=dcfg.seq_len, seed=seed, batch_size=batch_size)


def eval_batches(corpus: corpus_lib.Corpus, tok: Any, dcfg: DataConfig, *, batch_size: int, num_batches: int
                 ) -> list[Batch]:
    """``num_batches`` deterministic held-out batches (:func:`prosparse_jax.data.pipeline.make_eval_batches`)."""
    return [{k: jnp.asarray(v) for k, v in b.items()}
            for b in data_lib.make_eval_batches(corpus, tok, seq_len=dcfg.seq_len, batch_size=batch_size,
                                                num_batches=num_batches)]


def split_held_out(batches: list[Batch]) -> tuple[list[Batch], list[Batch]]:
    """(calibration batches, measurement batches): the even and the odd ones of a :func:`eval_batches` list (disjoint
    rows spread over the whole split when it has enough rows)."""
    return batches[0::2], batches[1::2]


def as_device(batch: dict[str, np.ndarray]) -> Batch:
    """A host batch on the device."""
    return {k: jnp.asarray(v) for k, v in batch.items()}
