"""End-to-end decode speed: our sparse vs dense decode, and our dense decode vs HF transformers ``generate``.

    python experiments/bench_decode.py --d_model=4096 --d_ff=11008 --n_layers=2 --sparsity=0.88 --new_tokens=32
    python experiments/bench_decode.py --rank=1024 --predictor_ratio=1.3 --busy   # + predictor row, one core busy
    python experiments/bench_decode.py --checkpoint=<workdir or HF folder> --new_tokens=32   # a trained model
    python experiments/bench_decode.py --checkpoint=<workdir> --predictor=<its predictor folder>
    python experiments/bench_decode.py --n_layers=4 --new_tokens=64 --batch=1,4 --dtype=bfloat16 --rank=0 \
        --implementations=pallas_triton,pallas_compact --torch   # on a GPU (experiments/gpu_checks.sh, step decode)

A random FATReLU model at the given FFN width (threshold set to the ``--sparsity`` quantile of the prompt's gates), or
a trained one, batch 1 (``--batch=1,4``: each batch size in turn, B random prompts), fp32 (``--dtype=bfloat16``: the
model's compute dtype, matmul weights cast once before timing), greedy. On a CPU in fp32 every sparse backend must
emit the dense decode's tokens; elsewhere (bf16, or a GPU: summation orders differ, and a random model's logits are
flat) disagreement is reported, not fatal: the first divergent step and the agreement rate per backend. ``--torch``
adds transformers' ``LlamaForCausalLM`` (ReLU) with the same weights on ``--torch_device`` (default: CUDA where torch
sees a GPU), the prefill subtracted, with its token agreement and the max |logit difference| of the first new token
(``--torch_compile``: static cache + ``torch.compile(mode="reduce-overhead")`` as a second row). Prints median decode
tokens/s per backend (all rows of the batch) and the ratio to dense (compile excluded). Results: docs/benchmarks.md.

Predictor row (``cpu_ffi+predictor``): with ``--rank=R`` the random model's W_gate is made of rank R/2 (W_gate = P Q,
same bytes as a full-rank one) and its predictor is exact: w1 = [P, -P], w2 = [Q; -Q], so relu(x w1) w2 = x W_gate
(half of the hidden units are zero on every token, as in a ReLU hidden layer), and the predictor's threshold is the
quantile of the prompt's gates that predicts ``--predictor_ratio`` times the true active set: a superset of it on every
token (the tokens must equal the dense decode's). ``--predictor=<dir>`` decodes a trained model with its trained
predictor instead. ``--busy`` keeps a background process spinning on one core while timing.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from prosparse_jax import files
from prosparse_jax.config import ModelConfig
from prosparse_jax.errors import CheckpointError, UsageError
from prosparse_jax.inference import generate, sparse_ffn
from prosparse_jax.main import common
from prosparse_jax.model import transformer as model


def load_trained(path: str, prompt_len: int) -> tuple[ModelConfig, model.Params, list[int]]:
    """A trained model as it is, and a prompt of real text (standard-library source) under its tokenizer."""
    import json as json_module

    from tokenizers import Tokenizer

    from prosparse_jax.training.model_io import load_model

    cfg, params, tok_path = load_model(path)
    if tok_path is None:
        raise CheckpointError(f"{path} has no tokenizer.json; the prompt needs the model's tokenizer")
    text = (Path(json_module.__file__).parent / "decoder.py").read_text()
    ids = Tokenizer.from_file(str(tok_path)).encode(text).ids[:prompt_len]
    return generate.sparse_config(cfg, sparse=True), params, ids


def build(args: argparse.Namespace) -> tuple[ModelConfig, model.Params, list[int], dict | None]:
    """Random ReLU model, FATReLU threshold at the requested sparsity of the prompt's gates, the prompt, and with
    ``args.rank`` an exact predictor of a superset of ``args.predictor_ratio`` times the active set (module doc)."""
    cfg = ModelConfig(vocab_size=args.vocab, d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads,
                      n_kv_heads=args.n_heads, d_ff=args.d_ff, activation="relu", init_std=0.02)
    params = jax.jit(lambda k: model.init_params(cfg, k))(jax.random.key(0))
    factors = None
    if args.rank:
        params, factors = _low_rank_gates(params, cfg, args.rank // 2)
    prompt = np.random.default_rng(0).integers(1, cfg.vocab_size, size=args.prompt_len).tolist()
    _, st = model.forward(params, jnp.asarray([prompt]), cfg, capture=True)
    gates = np.asarray(st.act_gate)  # relu(gate): the quantile above 0 is the one of the gate itself
    t = float(np.quantile(gates.ravel(), args.sparsity)) if args.sparsity > 0 else 0.0
    pred = None
    if factors is not None:
        q = 1.0 - args.predictor_ratio * (1.0 - args.sparsity)  # the predicted fraction: ratio x the active one
        thr_L = [min(float(np.quantile(g.ravel(), q)), t) for g in gates]  # never above t: a superset
        P_LxDxK, Q_LxKxF = factors
        pred = {"w1_LxDxR": jnp.concatenate([P_LxDxK, -P_LxDxK], axis=2),
                "w2_LxRxF": jnp.concatenate([Q_LxKxF, -Q_LxKxF], axis=1),
                "b2_LxF": jnp.zeros((cfg.n_layers, cfg.d_ff), jnp.float32),
                "threshold_L": jnp.asarray(thr_L, jnp.float32)}
    return cfg.replace(activation="fatrelu", activation_threshold=t), params, prompt, pred


def _low_rank_gates(params: model.Params, cfg: ModelConfig, k: int) -> tuple[model.Params, tuple]:
    """``params`` with every W_gate replaced by P Q of rank k (entries of the init's scale), and (P [L, D, k],
    Q [L, k, F])."""
    kp, kq = jax.random.split(jax.random.key(1))
    L, D, F = cfg.n_layers, cfg.d_model, cfg.d_ff
    P = jax.random.normal(kp, (L, D, k), jnp.float32) / np.sqrt(D)
    Q = jax.random.normal(kq, (L, k, F), jnp.float32) * (cfg.init_std * np.sqrt(D / k))
    layers = dict(params["layers"], w_gate_LxDxF=jnp.einsum("ldk,lkf->ldf", P, Q))
    return dict(params, layers=layers), (P, Q)


def predicted_over_true(params: model.Params, cfg: ModelConfig, pred: dict, ids: list[int]) -> list[float]:
    """Per layer, the size of the synthetic predictor's set over the true active set's, summed over the tokens ``ids``
    (its logits are the gates: one forward of the ReLU model counts both)."""
    relu = cfg.replace(activation="relu", activation_threshold=0.0)
    _, st = model.forward(params, jnp.asarray([ids]), relu, capture=True)
    gates_L = np.asarray(st.act_gate)  # relu(gate); both cuts are > 0
    thr_L = np.asarray(pred["threshold_L"])
    return [float(np.sum(g > thr) / max(np.sum(g >= cfg.activation_threshold), 1)) for g, thr in zip(gates_L, thr_L,
                                                                                                        strict=True)]


@functools.cache
def _ffn(implementation: str) -> Any:
    """The decode FFN hook of a sparse backend: one object per backend, so repeated ``generate`` calls hit JAX's
    compilation caches (the hook is a static argument)."""
    return functools.partial(generate.sparse_decode_ffn, implementation=implementation)


def time_ours(params: model.Params, cfg: ModelConfig, prompt: list[int] | list[list[int]], n: int,
              implementation: str = "dense") -> tuple[float, Any, list[float]]:
    """(decode tokens/s of all rows, new tokens, sparsity per layer) of ``generate`` with the dense FFN or a sparse
    backend; ``prompt`` one prompt (its new tokens returned as one list) or a batch of them (a list per row)."""
    batch = bool(prompt) and isinstance(prompt[0], list)
    prompts = prompt if batch else [prompt]
    ffn = None if implementation == "dense" else _ffn(implementation)
    news, stats = generate.generate(params, cfg, prompts, max_new_tokens=n, ffn=ffn)
    return stats.decode_tokens_per_s, news if batch else news[0], stats.sparsity_per_layer


def torch_device(choice: str) -> str:
    """``--torch_device``: ``auto`` -> ``cuda`` where torch sees a GPU, else ``cpu``."""
    if choice != "auto":
        return choice
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def torch_model(cfg: ModelConfig, params: model.Params, device: str = "cpu", dtype: str = "float32"):
    """transformers' ``LlamaForCausalLM`` with ``params`` (``cfg.activation`` must be one it runs, e.g. relu), in
    ``dtype`` on ``device``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from prosparse_jax.hf.config import hf_config_from_model
    from prosparse_jax.hf.weights import to_hf_state_dict

    raw = hf_config_from_model(cfg, "llama")
    keep = {k: v for k, v in raw.items() if k in LlamaConfig().to_dict() and k not in ("torch_dtype", "dtype")}
    m = LlamaForCausalLM(LlamaConfig(**keep)).eval()
    sd = {k: torch.from_numpy(np.array(v, dtype=np.float32, copy=True))
          for k, v in to_hf_state_dict(cfg, params, fold=True).items()}
    m.load_state_dict(sd, strict=False)
    return m.to(device=device, dtype=getattr(torch, dtype))


def compile_torch(m) -> Any:
    """``m`` decoding with a static KV cache and its forward under ``torch.compile(mode="reduce-overhead")`` (CUDA
    graphs): the strong PyTorch baseline (gpt-fast / TEAL measure this way)."""
    import torch

    m.generation_config.cache_implementation = "static"
    m.forward = torch.compile(m.forward, mode="reduce-overhead", fullgraph=True)
    return m


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_torch(m, prompt: list[int] | list[list[int]], n: int) -> tuple[float, Any]:
    """(decode tokens/s of all rows, new tokens) of transformers' greedy ``generate``: (n - 1) B tokens over
    t(n) - t(1), the prefill and first token subtracted; the device synchronized around every timing."""
    import torch

    batch = bool(prompt) and isinstance(prompt[0], list)
    rows = prompt if batch else [prompt]
    device = str(next(m.parameters()).device)
    ids = torch.tensor(rows, device=device)
    mask = torch.ones_like(ids)

    def run(k: int) -> tuple[float, list[list[int]]]:
        _sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = m.generate(ids, attention_mask=mask, max_new_tokens=k, min_new_tokens=k, do_sample=False,
                             pad_token_id=0)
        _sync(device)
        return time.perf_counter() - t0, out[:, ids.shape[1]:].tolist()

    run(n)  # warm-up (and compilation with compile_torch)
    t1 = min(run(1)[0] for _ in range(3))
    tn, toks = run(n)
    # NaN where noise makes t(n) <= t(1) (few new tokens on a busy machine): no speed to report
    tps = len(rows) * (n - 1) / (tn - t1) if tn > t1 else float("nan")
    return tps, toks if batch else toks[0]


def torch_logit_diff(m, params: model.Params, cfg: ModelConfig, prompt: list[int]) -> float:
    """max |our logits - transformers' logits| of the first new token (the prompt's last position)."""
    import torch

    ours = np.asarray(model.forward(params, jnp.asarray([prompt]), cfg)[0][0, -1], np.float32)
    device = str(next(m.parameters()).device)
    with torch.no_grad():
        theirs = m(torch.tensor([prompt], device=device)).logits[0, -1].float().cpu().numpy()
    return float(np.max(np.abs(ours - theirs)))


def agreement(ref: list[list[int]], toks: list[list[int]]) -> dict[str, Any]:
    """Token agreement of a decode with the reference one: the first step (1-based) where any row differs (None: the
    same tokens) and the fraction of equal tokens over every row and step."""
    first, same, total = None, 0, 0
    for r, t in zip(ref, toks, strict=True):
        for i, (a, b) in enumerate(zip(r, t, strict=False)):
            same += int(a == b)
            if a != b and (first is None or i + 1 < first):
                first = i + 1
        total += max(len(r), len(t))
        if len(r) != len(t) and first is None:
            first = min(len(r), len(t)) + 1
    return {"first_divergent_step": first, "agreement": same / max(total, 1)}


def _parser() -> argparse.ArgumentParser:
    p = common.ArgumentParser(description=__doc__, prog="bench_decode")
    p.add_argument("--checkpoint", default="", help="a trained workdir / HF folder instead of the random model")
    p.add_argument("--d_model", type=int, default=4096)
    p.add_argument("--d_ff", type=int, default=11008)
    p.add_argument("--n_layers", type=int, default=2)
    p.add_argument("--n_heads", type=int, default=32)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--sparsity", type=float, default=0.88, help="target FATReLU sparsity in [0, 1)")
    p.add_argument("--prompt_len", type=int, default=16)
    p.add_argument("--new_tokens", type=int, default=32)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--implementations", default="dense,cpu_gather,cpu_ffi",
                   help="sparse FFN backends to time (prosparse_jax.inference.sparse_ffn: e.g. cpu_ffi, "
                        "pallas_triton, pallas_compact); the dense decode is always timed")
    p.add_argument("--batch", default="1", help="batch sizes, comma-separated (e.g. 1,4): each timed in turn")
    p.add_argument("--dtype", default="", choices=("", "float32", "bfloat16"),
                   help="the model's compute dtype, matmul weights cast once before timing (default: the model's; "
                        "the random model's is float32)")
    p.add_argument("--rank", type=int, default=1024, help="random model: the synthetic predictor's rank (0: no "
                   "predictor row)")
    p.add_argument("--predictor_ratio", type=float, default=1.3,
                   help="random model: the predicted set's size over the true active set's (>= 1: a superset)")
    p.add_argument("--predictor", default="", help="with --checkpoint: a trained predictor folder of that model")
    p.add_argument("--busy", action="store_true", help="a background process spins on one core while timing")
    p.add_argument("--torch", action="store_true", help="also time transformers generate (dense ReLU model)")
    p.add_argument("--torch_device", default="auto", help="--torch's device: auto (cuda where torch sees a GPU, "
                   "else cpu), cpu, cuda, cuda:N")
    p.add_argument("--torch_compile", action="store_true",
                   help="with --torch: also a static-cache + torch.compile(mode='reduce-overhead') row")
    p.add_argument("--compilation_cache", default="",
                   help="keep XLA's compiled programs in this folder (JAX's persistent cache): every generate call "
                        "lowers its programs afresh, and this loads the repeated ones instead of compiling them "
                        "(\"\": off)")
    p.add_argument("--out", default="", help="write the results JSON here")
    return p


def _check(args: argparse.Namespace) -> list[str]:
    """The sparse backends to time; a :class:`UsageError` on bad arguments."""
    if not 0 <= args.sparsity < 1 or args.new_tokens < 2:
        raise UsageError("--sparsity must be in [0, 1) and --new_tokens >= 2")
    try:
        names = [sparse_ffn.resolve_implementation(n) for n in args.implementations.split(",") if n]
    except UsageError as e:
        raise UsageError(f"--implementations: {e}") from None
    impls = list(dict.fromkeys(n for n in names if n != "dense"))
    if args.checkpoint and args.torch:
        raise UsageError("--torch compares random ReLU models; drop it with --checkpoint")
    if args.rank < 0 or args.rank % 2 or args.predictor_ratio < 1:
        raise UsageError("--rank must be even and >= 0 (0: no predictor row), --predictor_ratio >= 1")
    if args.predictor and not args.checkpoint:
        raise UsageError("--predictor is a trained model's predictor; give its --checkpoint (the random model gets "
                         "a synthetic one from --rank)")
    if args.torch_compile and not args.torch:
        raise UsageError("--torch_compile is a second PyTorch row: add --torch")
    try:
        args.batches = [int(b) for b in str(args.batch).split(",") if b]
    except ValueError:
        args.batches = []
    if not args.batches or min(args.batches) < 1:
        raise UsageError(f"--batch must be batch sizes >= 1, comma-separated (e.g. 1,4); got {args.batch!r}")
    return impls


PREDICTOR_ROW = "cpu_ffi+predictor"


def _alternate(cfg: ModelConfig, params: Any, decoders: dict[str, tuple[Any, str]], prompts: list[list[int]],
               tms: dict[str, Any], args: argparse.Namespace, strict: bool = True
               ) -> tuple[dict[str, list[float]], list[float], list[list[int]], dict[str, dict[str, Any]]]:
    """``args.reps`` alternating rounds of the dense decode and every ``decoders`` row (name -> (params, sparse FFN
    backend)) on the batch ``prompts``, and with ``tms`` (row name -> transformers model) our dense ReLU decode and
    theirs; returns (tok/s per round per name, sparsity per layer, the dense decode's tokens per row, token agreement
    per name: the worst round's :func:`agreement` with the dense decode, and the PyTorch rows' with our ReLU decode).

    Raises:
      AssertionError: with ``strict``, a sparse decode's tokens differ from the dense decode's (a bug).
    """
    relu = cfg.replace(activation="relu", activation_threshold=0.0)
    rows: dict[str, list[float]] = {"dense": [], **{n: [] for n in decoders}, "relu_dense": [],
                                    **{n: [] for n in tms}}
    agree: dict[str, dict[str, Any]] = {}

    def note(name: str, ref: list[list[int]], toks: list[list[int]]) -> None:
        a = agreement(ref, toks)
        old = agree.get(name)
        if old is None or a["agreement"] < old["agreement"]:
            agree[name] = a

    time_ours(params, cfg, prompts, args.new_tokens)  # warm-up (first-call allocations, compilation)
    for p, impl in decoders.values():
        time_ours(p, cfg, prompts, args.new_tokens, impl)
    sp: list[float] = []
    toks_d: list[list[int]] = []
    for _ in range(args.reps):
        d, toks_d, sp = time_ours(params, cfg, prompts, args.new_tokens)
        rows["dense"].append(d)
        for name, (p, impl) in decoders.items():
            s, toks_s, _ = time_ours(p, cfg, prompts, args.new_tokens, impl)
            if strict and toks_s != toks_d:
                raise AssertionError(f"sparse decode ({name}) emitted other tokens than dense decode")
            note(name, toks_d, toks_s)
            rows[name].append(s)
        if tms:
            r, toks_r, _ = time_ours(params, relu, prompts, args.new_tokens)
            rows["relu_dense"].append(r)
            for name, tm in tms.items():
                t, toks_t = time_torch(tm, prompts, args.new_tokens)
                rows[name].append(t)
                note(name, toks_r, toks_t)
                if name == "torch_relu":
                    rows.setdefault("same_tokens_as_torch", []).append(float(toks_r == toks_t))
    return rows, sp, toks_d, agree


BUSY_LOOP = "while True: pass"


@contextlib.contextmanager
def busy_core(on: bool) -> Iterator[None]:
    """With ``on``: a background process spinning on one core (another job on the machine) for the block."""
    if not on:
        yield
        return
    proc = subprocess.Popen([sys.executable, "-c", BUSY_LOOP])
    try:
        time.sleep(0.5)  # running before the timing starts
        yield
    finally:
        proc.kill()
        proc.wait()


def _without_predictor(sparse_params: model.Params) -> model.Params:
    """The same per-layer arrays less the predictor's (and W_gate^T): the sparse decode without a predictor."""
    drop = {"w_gate_t_LxFxD", "pred_threshold_Lx1", *generate.PREDICTOR_KEYS.values()}
    return dict(sparse_params, layers=[{k: v for k, v in g.items() if k not in drop} for g in sparse_params["layers"]])


def _prompts(prompt: list[int], batch: int, vocab: int) -> list[list[int]]:
    """``batch`` prompts of ``prompt``'s length: ``prompt`` first, then random ids."""
    rng = np.random.default_rng(1)
    return [prompt] + [rng.integers(1, vocab, size=len(prompt)).tolist() for _ in range(batch - 1)]


def _run(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    impls = _check(args)
    common.use_compilation_cache(args.compilation_cache)
    pred = None
    if args.checkpoint:
        files.check_model_path(args.checkpoint, "--checkpoint")
        cfg, params, prompt = load_trained(args.checkpoint, args.prompt_len)
        if args.predictor:
            from prosparse_jax.predictor import io as predictor_io

            pred, _ = predictor_io.load_predictor(Path(args.predictor), cfg)
    else:
        cfg, params, prompt, pred = build(args)
    cfg = cfg.replace(dtype=args.dtype or cfg.dtype)
    platform = jax.default_backend()
    # CPU fp32: every backend must emit the dense decode's tokens; bf16 or a GPU: reported (summation orders differ)
    strict = platform == "cpu" and cfg.dtype == "float32"
    # per-layer layout, prepared once; matmul weights cast to the compute dtype once (generate's cast is then exact)
    pred_params = generate.cast_weights(generate.prepare_sparse_params(params, pred), cfg)
    decoders = {n: (_without_predictor(pred_params), n) for n in impls}
    if pred is not None:
        pred_impl = "cpu_ffi" if platform == "cpu" else sparse_ffn.resolve_implementation("auto")
        decoders[PREDICTOR_ROW if pred_impl == "cpu_ffi" else f"{pred_impl}+predictor"] = (pred_params, pred_impl)
    tms: dict[str, Any] = {}
    relu = cfg.replace(activation="relu", activation_threshold=0.0)
    device = ""
    if args.torch:
        import torch

        device = torch_device(args.torch_device)
        torch.set_num_threads(os.cpu_count() or 1)
        tms["torch_relu"] = torch_model(relu, params, device, cfg.dtype)
        if args.torch_compile:
            tms["torch_relu_compiled"] = compile_torch(torch_model(relu, params, device, cfg.dtype))
    stacked = params
    # generate() decodes in the per-layer layout: split the layers once
    params = generate.cast_weights(model.unstack_layers(params), cfg)
    res: dict[str, Any] = {"model": args.checkpoint or "random", "shape": f"{cfg.d_model}x{cfg.d_ff}",
                           "layers": cfg.n_layers, "activation": cfg.activation,
                           "threshold": cfg.activation_threshold, "dtype": cfg.dtype, "busy": args.busy,
                           "devices": str(jax.devices()), "cpus": os.cpu_count(), "strict_tokens": strict}
    by_batch: dict[str, dict[str, Any]] = {}
    toks0: list[int] = []
    for B in args.batches:
        prompts = _prompts(prompt, B, cfg.vocab_size)
        with busy_core(args.busy):
            rows, sp, toks, agree = _alternate(cfg, params, decoders, prompts, tms, args, strict)
        toks0 = toks0 or toks[0]
        med = {k: statistics.median(v) for k, v in rows.items() if v}
        r: dict[str, Any] = {"batch": B, "measured_sparsity_per_layer": sp, "decode_tokens_per_s": med,
                             "over_dense": {n: med[n] / med["dense"] for n in decoders},
                             "token_agreement": agree}
        if tms:
            r["ours_over_torch_dense_relu"] = med["relu_dense"] / med["torch_relu"]
            if "torch_relu_compiled" in med:
                r["ours_over_torch_compiled_relu"] = med["relu_dense"] / med["torch_relu_compiled"]
        by_batch[str(B)] = r
    res.update(by_batch[str(args.batches[0])])  # the first batch size's rows at the top (one batch: as before)
    if len(by_batch) > 1:
        res["by_batch"] = by_batch
    if pred is not None:
        res["predictor_rank"] = int(pred["w1_LxDxR"].shape[-1])
        if not args.checkpoint:
            res["predicted_over_true_per_layer"] = predicted_over_true(stacked, cfg.replace(dtype="float32"), pred,
                                                                       prompt + toks0)
    if tms:
        res["torch_device"] = device
        res["torch_max_logit_diff_step1"] = torch_logit_diff(tms["torch_relu"], stacked, relu, prompt)
    print(json.dumps(res))
    if args.out:
        files.write_text_atomic(args.out, json.dumps(res, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Returns the exit code (1 with one error line on stderr for bad input; --verbose: traceback)."""
    return common.call("bench_decode", argv, lambda: _run(argv))


if __name__ == "__main__":
    sys.exit(main())
