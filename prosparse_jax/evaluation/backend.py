"""The lm-evaluation-harness model ``prosparse``: a workdir or HF folder scored in one sparse mode at a time, with the
activation sparsity measured while each task ran.

Requests are processed as lm-eval's ``hf`` backend processes them (the same context / continuation split, left
truncation to the context and rolling windows, stop sequences), so the two agree on the same model; BOS is explicit:
with ``add_bos`` (default, as the ProSparse model card asks) every context starts with the BOS token. Rolling
log-likelihoods always condition the first token on the BOS token (lm-eval's prefix token) and never score BOS itself.

Batches hold requests of one task, sorted by length, padded on the right to a length bucket (:func:`bucket`) and to
``batch_size`` rows, so few shapes compile. Sparsity is counted inside the sparse forward over the valid (unpadded)
input tokens, per layer (:attr:`ProsparseLM.sparsity`), as ``analyze`` counts it; generation counts the decoded
tokens (:class:`prosparse_jax.inference.generate.GenerateStats`).
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import lm_eval.models
import numpy as np
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

from prosparse_jax import files
from prosparse_jax.data import corpus as corpus_lib
from prosparse_jax.data.corpus import EOS_TOKEN
from prosparse_jax.errors import CheckpointError, InputError, UsageError, did_you_mean
from prosparse_jax.evaluation import modes as modes_lib
from prosparse_jax.inference import generate as generate_lib
from prosparse_jax.inference import score as score_lib
from prosparse_jax.model import transformer as model
from prosparse_jax.training.model_io import load_model

log = logging.getLogger(__name__)

# lm-eval's own backends, registered (lazily) by importing lm_eval.models: registering ours first would leave lm-eval
# believing its registry already loaded, and hide them
LM_EVAL_MODELS = tuple(lm_eval.models.MODEL_MAPPING)

MIN_BUCKET = 16
DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's default
UNTASKED = "(no task)"  # the sparsity key of requests without a task name
ARGS = ("pretrained", "checkpoint", "step", "mode", "add_bos", "batch_size", "max_length", "max_gen_toks",
        "scale_data", "device", "max_batch_size")


def bucket(n: int, max_length: int) -> int:
    """The padded length of a sequence of ``n`` tokens: the next of 16, 32, 48, 64, 80, 112, 144, 192, 240, ... (steps
    of about 1.25x, multiples of 16: few shapes, at most ~25% padding past 64 tokens), at most ``max_length``."""
    b = MIN_BUCKET
    while b < n:
        b = max(b + MIN_BUCKET, -(-b * 5 // 4 // MIN_BUCKET) * MIN_BUCKET)
    return max(n, min(b, max_length))


class SparsityMeter:
    """Exact zeros of x1 per layer and the tokens they were counted on, per task."""

    def __init__(self) -> None:
        self.zeros: dict[str, np.ndarray] = {}
        self.tokens: dict[str, float] = defaultdict(float)
        self.d_ff = 1

    def add(self, task: str, zeros_L: np.ndarray, tokens: float, d_ff: int) -> None:
        """Adds ``zeros_L`` zero units (per layer) counted over ``tokens`` tokens x ``d_ff``."""
        self.d_ff = d_ff
        z = np.asarray(zeros_L, np.float64)
        self.zeros[task] = self.zeros[task] + z if task in self.zeros else z
        self.tokens[task] += float(tokens)

    def result(self, task: str) -> dict[str, Any] | None:
        """{sparsity (plain mean over layers), sparsity_per_layer, tokens} of ``task``, None if nothing counted."""
        if task not in self.zeros or self.tokens[task] <= 0:
            return None
        per_layer = self.zeros[task] / (self.tokens[task] * self.d_ff)
        return {"sparsity": float(per_layer.mean()), "sparsity_per_layer": [float(x) for x in per_layer],
                "tokens": int(round(self.tokens[task]))}

    def results(self) -> dict[str, dict[str, Any]]:
        """:meth:`result` of every task counted."""
        return {t: r for t in self.zeros if (r := self.result(t)) is not None}


def _as_bool(name: str, v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if str(v).lower() in ("true", "1", "yes"):
        return True
    if str(v).lower() in ("false", "0", "no"):
        return False
    raise UsageError(f"{name}: expected true or false, got {v!r}")


def _as_int(name: str, v: Any, low: int) -> int:
    try:
        i = int(str(v).strip()) if not isinstance(v, int) else v
    except ValueError:
        raise UsageError(f"{name}: expected an integer, got {v!r}") from None
    if isinstance(v, bool) or i < low:
        raise UsageError(f"{name}: expected an integer >= {low}, got {v!r}")
    return i


def _special_tokens(path: Path, tok: Any) -> tuple[str, str]:
    """(bos, eos) token strings: the HF folder's tokenizer_config.json's, else ``<s>`` / ``</s>`` when the vocabulary
    has them, else ``<|endoftext|>`` (the built-in corpus's document separator, which exports name bos and eos)."""
    cfg_path = path / "tokenizer_config.json"
    names: dict[str, str] = {}
    if cfg_path.is_file():
        raw = files.read_json(cfg_path, "tokenizer_config.json")
        for k in ("bos_token", "eos_token"):
            v = raw.get(k) if isinstance(raw, dict) else None
            v = v.get("content") if isinstance(v, dict) else v
            if isinstance(v, str) and tok.token_to_id(v) is not None:
                names[k] = v
    bos = names.get("bos_token") or ("<s>" if tok.token_to_id("<s>") is not None else EOS_TOKEN)
    eos = names.get("eos_token") or ("</s>" if tok.token_to_id("</s>") is not None else EOS_TOKEN)
    for what, t in (("bos", bos), ("eos", eos)):
        if tok.token_to_id(t) is None:
            raise CheckpointError(f"{path}: the tokenizer has no {what} token ({t!r}); the evaluation needs one")
    return bos, eos


@register_model("prosparse")
class ProsparseLM(TemplateLM):
    """lm-eval model of a prosparse_jax workdir or HF folder in one sparse mode (:mod:`.modes`).

    Args (lm-eval model_args, e.g. ``pretrained=runs/tiny,mode=fatrelu:0.01,add_bos=true``):
      pretrained / checkpoint: workdir or HF model folder (with tokenizer.json).
      step: checkpoint step of a workdir (default: the latest).
      mode: the sparse mode (:func:`prosparse_jax.evaluation.modes.parse_mode`); :meth:`set_mode` changes it.
      add_bos: prepend the BOS token to every context (default true).
      batch_size: rows per forward (default 8; ``auto`` means the default).
      max_length: context in tokens (default: the model's, :func:`prosparse_jax.inference.score.context_window`).
      max_gen_toks: default new tokens of ``generate_until`` (a task's ``max_gen_toks`` wins).
      scale_data: held-out data for relative FATReLU thresholds (default ``stdlib``; or ``files:<glob>``).
      device, max_batch_size: accepted for lm-eval's command line and ignored (JAX places the model).
    """

    def __init__(self, pretrained: str | None = None, checkpoint: str | None = None, step: int | None = None,
                 mode: str = "dense", add_bos: bool | str = True, batch_size: int | str = DEFAULT_BATCH_SIZE,
                 max_length: int | None = None, max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, scale_data: str = "stdlib",
                 device: str | None = None, max_batch_size: int | None = None, **unknown: Any) -> None:
        super().__init__()
        if unknown:
            name = sorted(unknown)[0]
            raise UsageError(f"prosparse model: unknown argument {name!r}"
                             f"{did_you_mean(name, ARGS)}; choose from: {', '.join(ARGS)}")
        del device, max_batch_size
        path = pretrained if pretrained is not None else checkpoint
        if path is None:
            raise UsageError("prosparse model: give pretrained=<workdir or HF folder>")
        self.path = files.check_model_path(path, "checkpoint")
        self.add_bos = _as_bool("add_bos", add_bos)
        self.batch_size_per_device = DEFAULT_BATCH_SIZE if str(batch_size) == "auto" else \
            _as_int("batch_size", batch_size, 1)
        self._max_gen_toks = _as_int("max_gen_toks", max_gen_toks, 1)
        self.scale_data = str(scale_data)
        self.step = None if step is None else _as_int("step", step, 0)
        self.mode_spec = modes_lib.parse_mode(mode)  # a bad mode is refused before the model is loaded
        ctx, self.context_source = score_lib.context_window(self.path)
        self._max_length = _as_int("max_length", max_length, 2) if max_length is not None else ctx
        self.model_cfg, params, tok_path = load_model(self.path, self.step)
        if tok_path is None:
            raise CheckpointError(f"{self.path} has no tokenizer.json; copy the tokenizer used for training next to "
                                  "config.json")
        self.tokenizer_json = tok_path
        self.tok = corpus_lib.load_model_tokenizer(tok_path, self.model_cfg.vocab_size)
        self.bos_token, self.eos_token = _special_tokens(self.path, self.tok)
        self.params = jax.device_put(params)
        self.sparsity = SparsityMeter()
        self.timing = {"tokens": 0, "seconds": 0.0}
        self._scorers: dict[str, Callable[..., Any]] = {}
        self._scale: float | None = None
        self.mode = modes_lib.resolve_mode(self.mode_spec, self.model_cfg, checkpoint=self.path,
                                           scale=self.positive_gate_mean)

    # ------------------------------------------------------------------------------------------------- modes
    def set_mode(self, mode: str | modes_lib.ModeSpec) -> modes_lib.SparseMode:
        """Switches to ``mode`` (the model stays loaded) and starts a fresh :attr:`sparsity` count."""
        self.mode = modes_lib.resolve_mode(mode, self.model_cfg, checkpoint=self.path, scale=self.positive_gate_mean)
        self.sparsity = SparsityMeter()
        self.timing = {"tokens": 0, "seconds": 0.0}
        return self.mode

    def positive_gate_mean(self, dense_cfg: Any) -> float:
        """The model's mean positive gate activation on held-out batches of :attr:`scale_data` (computed once)."""
        if self._scale is None:
            from prosparse_jax.analysis import frontier, measure

            run_data = measure.run_data_section(files.read_json(self.path / "config.json", "config.json"))
            seq_len = min(self._max_length, int(run_data.get("seq_len", 256)))
            by_src, _ = measure.load_eval([self.scale_data], self.tokenizer_json, run_data, seq_len, None, 4, 2,
                                          self.model_cfg.vocab_size)
            batches = [b for bs in by_src.values() for b in bs]
            self._scale = frontier.positive_gate_mean(self.params, dense_cfg, batches)
        return self._scale

    # ------------------------------------------------------------------------------------------------- lm-eval API
    @property
    def eot_token_id(self) -> int:
        return self.tok.token_to_id(self.eos_token)

    @property
    def prefix_token_id(self) -> int:
        return self.tok.token_to_id(self.bos_token)

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_device

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer_json)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """Token ids of ``string``, with the BOS token first when ``add_special_tokens`` (None: ``add_bos``) and the
        string does not already start with it."""
        ids = self.tok.encode(string, add_special_tokens=False).ids
        bos = self.add_bos if add_special_tokens is None else add_special_tokens
        if bos and not (add_special_tokens is None and string.startswith(self.bos_token)):
            ids = [self.prefix_token_id, *ids]
        return ids

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.tok.decode(list(tokens), skip_special_tokens=True)

    def get_model_info(self) -> dict[str, Any]:
        """What lm-eval records about the model in its results."""
        return {"checkpoint": str(self.path), "step": self.step, "mode": self.mode.name,
                "mode_settings": self.mode.settings, "add_bos": self.add_bos, "max_length": self.max_length,
                "activation": self.model_cfg.activation, "n_layers": self.model_cfg.n_layers,
                "d_ff": self.model_cfg.d_ff}

    @staticmethod
    def _check_requests(requests: Sequence[Any], what: str) -> None:
        if not requests:
            raise InputError(f"{what}: no requests to run; the task produced no documents (check its data file, "
                             "its split and --limit)")

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(log p(continuation | context), whether greedy decoding produces it) per ``(context, continuation)``."""
        self._check_requests(requests, "loglikelihood")
        pairs = []
        for i, (context, continuation) in enumerate(r.args for r in requests):
            if context == "":
                cont = self.tok_encode(continuation, add_special_tokens=False)
                if not cont:
                    raise InputError(f"loglikelihood: request {i} has an empty context and continuation")
                ctx_enc, cont_enc = ([self.prefix_token_id], cont) if cont[0] != self.prefix_token_id else \
                    (cont[:1], cont[1:])
            else:
                ctx_enc, cont_enc = self._encode_pair(context, continuation)
            if not cont_enc:
                raise InputError(f"loglikelihood: request {i}: the continuation {continuation!r} encodes to no tokens")
            pairs.append((ctx_enc, cont_enc))
        return self.score_tokens(pairs, [r.task_name or UNTASKED for r in requests])

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """log p(text) per request, in lm-eval's disjoint rolling windows of at most :attr:`max_length` tokens,
        the first token conditioned on the BOS token."""
        self._check_requests(requests, "loglikelihood_rolling")
        pairs, owner, tasks = [], [], []
        for i, r in enumerate(requests):
            (text,) = r.args
            windows = lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(text, add_special_tokens=False), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)
            for ctx, cont in map(lm_utils.make_disjoint_window, windows):
                pairs.append((ctx, cont))
                owner.append(i)
                tasks.append(r.task_name or UNTASKED)
        out = [0.0] * len(requests)
        for i, (lp, _) in zip(owner, self.score_tokens(pairs, tasks), strict=True):
            out[i] += lp
        for r, lp in zip(requests, out, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", r.args, lp)
        return out

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Continuations through the KV-cache :func:`inference.generate.generate` in the current mode (its x1 hook
        in the prefill and every step, as in scoring), cut at the first stop sequence (the task's ``until`` and the
        EOS token) and at ``max_gen_toks`` tokens; a batch stops decoding once every row holds a stop sequence."""
        self._check_requests(requests, "generate_until")
        groups: dict[tuple[str, str], list[int]] = defaultdict(list)
        for i, r in enumerate(requests):
            groups[(r.task_name or UNTASKED, json.dumps(r.args[1], sort_keys=True, default=str))].append(i)
        out: list[str | None] = [None] * len(requests)
        for (task, _), idx in groups.items():
            gen_kwargs = requests[idx[0]].args[1]
            for i, text in zip(idx, self._generate_group([requests[i].args[0] for i in idx], gen_kwargs, task),
                               strict=True):
                out[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return [str(t) for t in out]

    # ------------------------------------------------------------------------------------------------- scoring
    def _loglikelihood_tokens(self, requests: list[tuple[Any, list[int], list[int]]], **kwargs: Any
                              ) -> list[tuple[float, bool]]:
        """lm-eval's token-level entry: ``(request key, context_ids, continuation_ids)`` triples (no task)."""
        return self.score_tokens([(ctx, cont) for _, ctx, cont in requests])

    def score_tokens(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], tasks: Sequence[str] | None = None
                     ) -> list[tuple[float, bool]]:
        """(log p(continuation | context), greedy match) per ``(context_ids, continuation_ids)`` pair, in the current
        mode; the sparsity of every forward goes to :attr:`sparsity` under the pair's task.

        The model reads ``(context + continuation)[:-1]``, left-truncated to :attr:`max_length` tokens (lm-eval's
        rule). A continuation longer than that is scored in consecutive windows of :attr:`max_length` predicted
        tokens, each with the most context that fits (lm-eval's rolling windows; its ``hf`` backend refuses one).
        """
        if not pairs:
            raise InputError("score_tokens: no requests to run")
        tasks = list(tasks) if tasks is not None else [UNTASKED] * len(pairs)
        L = self.max_length
        rows: list[tuple[list[int], list[int], int, int]] = []  # (inputs, targets, scored tokens at the end, pair)
        for j, (ctx, cont) in enumerate(pairs):
            if not ctx or not cont:
                raise InputError(f"request {j}: {len(ctx)} context and {len(cont)} continuation tokens; it needs both")
            whole = [*ctx, *cont]
            N = len(whole)
            for a in range(N - len(cont), N, L):  # predicted positions [a, b) of whole, inputs whole[s:b-1]
                b = min(a + L, N)
                s = max(0, b - 1 - L)
                rows.append((whole[s:b - 1], whole[s + 1:b], b - a, j))
        sums = np.zeros(len(pairs))
        greedy = np.ones(len(pairs), bool)
        by_task: dict[str, list[int]] = defaultdict(list)
        for r, row in enumerate(rows):
            by_task[tasks[row[3]]].append(r)
        scorer = self._scorer()
        B, t0 = self.batch_size, time.perf_counter()
        for task, idx in by_task.items():
            idx = sorted(idx, key=lambda r: -len(rows[r][0]))
            for c in range(0, len(idx), B):
                chunk = idx[c:c + B]
                T = bucket(len(rows[chunk[0]][0]), L)
                K = bucket(max(rows[r][2] for r in chunk), T)  # the scored positions: the last K of each row
                ids_BxT = np.zeros((B, T), np.int32)
                seg_BxT = np.zeros((B, T), np.int32)
                at_BxK = np.zeros((B, K), np.int32)
                tgt_BxK = np.zeros((B, K), np.int32)
                for bi, r in enumerate(chunk):
                    inp, tgt = rows[r][:2]
                    n = len(inp)
                    ids_BxT[bi, :n], seg_BxT[bi, :n] = inp, 1
                    at_BxK[bi] = np.maximum(np.arange(n - K, n), 0)
                    tgt_BxK[bi] = np.asarray(tgt, np.int32)[at_BxK[bi]]
                lp_BxK, greedy_BxK, zero_frac_L, n_valid = scorer(self.params, self.mode.aux, ids_BxT, seg_BxT,
                                                                  at_BxK, tgt_BxK)
                lp_BxK, greedy_BxK = np.asarray(lp_BxK, np.float64), np.asarray(greedy_BxK)
                n_valid = int(n_valid)
                self.sparsity.add(task, np.asarray(zero_frac_L, np.float64) * n_valid * self.model_cfg.d_ff,
                                  n_valid, self.model_cfg.d_ff)
                self.timing["tokens"] += n_valid
                for bi, r in enumerate(chunk):
                    k, j = rows[r][2], rows[r][3]
                    sums[j] += lp_BxK[bi, K - k:].sum()
                    greedy[j] &= bool(greedy_BxK[bi, K - k:].all())
        self.timing["seconds"] += time.perf_counter() - t0
        return [(float(s), bool(g)) for s, g in zip(sums, greedy, strict=True)]

    def _scorer(self) -> Callable[..., Any]:
        """The jitted forward of the current mode: (params, aux, ids, segment ids, scored positions, their targets)
        -> (log p(target) and argmax == target per scored position, zero fraction of x1 per layer over the valid
        tokens, valid tokens). Modes of
        one program (the same hook and config: e.g. dense and every fatrelu threshold) share it, and so its
        compilations: their settings are in ``aux``."""
        key = (self.mode.hook, self.mode.cfg)
        if key not in self._scorers:
            hook, cfg = key
            self._scorers[key] = jax.jit(functools.partial(_score_batch, hook=hook, cfg=cfg))
        return self._scorers[key]

    # ------------------------------------------------------------------------------------------------- generation
    def _generate_group(self, contexts: list[str], gen_kwargs: dict[str, Any], task: str) -> list[str]:
        """Continuations of ``contexts`` that share ``gen_kwargs``, in batches of :attr:`batch_size`."""
        kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
        until = handle_stop_sequences(kwargs.pop("until", None), eos=self.eos_token)
        max_gen = int(kwargs.pop("max_gen_toks"))
        if max_gen >= self.max_length:
            raise UsageError(f"generate_until: max_gen_toks = {max_gen} leaves no room for a context in the model's "
                             f"{self.max_length} tokens")
        do_sample = bool(kwargs.pop("do_sample", False))
        temperature = float(kwargs.pop("temperature", 0.0)) if do_sample else 0.0
        sampling = dict(temperature=temperature, top_k=int(kwargs.pop("top_k", 0) or 0),
                        top_p=float(kwargs.pop("top_p", 1.0) or 1.0), seed=int(kwargs.pop("seed", 0) or 0))
        if not do_sample:
            sampling.update(top_k=0, top_p=1.0)
        prompts = [self.tok_encode(c)[-(self.max_length - max_gen):] or [self.prefix_token_id] for c in contexts]
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        out: list[str] = [""] * len(prompts)
        B, cfg = self.batch_size, self.mode.cfg
        for s in range(0, len(order), B):
            chunk = order[s:s + B]
            batch = [prompts[i] for i in chunk]
            batch += [batch[-1]] * (B - len(batch))  # a full batch: one shape per prompt length
            t0 = time.perf_counter()
            news, stats = generate_lib.generate(
                self.params, cfg, batch, max_new_tokens=max_gen, eos_id=self.eot_token_id, x1_hook=self.mode.hook,
                x1_hook_aux=self.mode.aux, stop=lambda rows: all(self._stopped(r, until) for r in rows),
                pad_to=bucket(len(batch[0]), self.max_length - max_gen), **sampling)
            self.timing["seconds"] += time.perf_counter() - t0
            self.timing["tokens"] += stats.prefill_tokens + stats.decoded_tokens
            if stats.decoded_tokens:
                zeros_L = np.asarray(stats.sparsity_per_layer, np.float64) * stats.decoded_tokens * cfg.d_ff
                self.sparsity.add(task, zeros_L, stats.decoded_tokens, cfg.d_ff)
            for i, new in zip(chunk, news, strict=False):
                out[i] = postprocess_generated_text(self.tok_decode(new), until, None)
        return out

    def _stopped(self, tokens: list[int], until: list[str]) -> bool:
        """Whether a generated row already holds one of the stop sequences (lm-eval's ``hf`` stopping rule: on the
        decoded continuation)."""
        text = self.tok_decode(tokens)
        return any(u in text for u in until)


def _score_batch(params: model.Params, aux: Any, ids_BxT: jax.Array, seg_BxT: jax.Array, at_BxK: jax.Array,
                 targets_BxK: jax.Array, *, hook: modes_lib.HookFactory, cfg: Any
                 ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """One padded batch with the x1 hook ``hook(params, aux)``: log p(target) and argmax == target at the positions
    ``at_BxK`` (the LM head runs there only), x1's zero fraction per layer over the valid tokens (``seg_BxT != 0``)
    and their number."""
    logits_BxKxV, stats = model.forward(params, ids_BxT, cfg, segment_ids_BxT=seg_BxT, x1_mask=hook(params, aux),
                                        logits_at_BxK=at_BxK)
    logp_BxKxV = jax.nn.log_softmax(logits_BxKxV.astype(jnp.float32), axis=-1)
    lp_BxK = jnp.take_along_axis(logp_BxKxV, targets_BxK[..., None], axis=-1)[..., 0]
    greedy_BxK = jnp.argmax(logits_BxKxV, axis=-1) == targets_BxK
    return lp_BxK, greedy_BxK, stats.zero_frac, jnp.sum(seg_BxT != 0)
