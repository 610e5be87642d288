"""End-to-end decode speed: our sparse vs dense decode, and our dense decode vs HF transformers ``generate``.

    python experiments/bench_decode.py --d_model=4096 --d_ff=11008 --n_layers=2 --sparsity=0.88 --new_tokens=32
    python experiments/bench_decode.py --checkpoint=<workdir or HF folder> --new_tokens=32   # a trained model

A random FATReLU model at the given FFN width (threshold set to the ``--sparsity`` quantile of the prompt's gates), or
a trained one, batch 1, fp32, greedy; every sparse backend must emit the dense decode's tokens. ``--torch`` adds
transformers' ``LlamaForCausalLM`` (ReLU) with the prefill subtracted. Prints median decode tokens/s per backend and
the ratio to dense (compile excluded). Results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
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


def build(args: argparse.Namespace) -> tuple[ModelConfig, model.Params, list[int]]:
    """Random ReLU model, FATReLU threshold at the requested sparsity of the prompt's gates, and the prompt."""
    cfg = ModelConfig(vocab_size=args.vocab, d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads,
                      n_kv_heads=args.n_heads, d_ff=args.d_ff, activation="relu", init_std=0.02)
    params = jax.jit(lambda k: model.init_params(cfg, k))(jax.random.key(0))
    prompt = np.random.default_rng(0).integers(1, cfg.vocab_size, size=args.prompt_len).tolist()
    _, st = model.forward(params, jnp.asarray([prompt]), cfg, capture=True)
    gates = np.asarray(st.act_gate).ravel()  # relu(gate): the quantile above 0 is the one of the gate itself
    t = float(np.quantile(gates, args.sparsity)) if args.sparsity > 0 else 0.0
    return cfg.replace(activation="fatrelu", activation_threshold=t), params, prompt


def time_ours(params: model.Params, cfg: ModelConfig, prompt: list[int], n: int, implementation: str = "dense"
              ) -> tuple[float, list[int], list[float]]:
    """(decode tokens/s, new tokens, sparsity per layer) of ``generate`` with the dense FFN or a sparse backend."""
    ffn = None if implementation == "dense" else functools.partial(generate.sparse_decode_ffn,
                                                                   implementation=implementation)
    news, stats = generate.generate(params, cfg, [prompt], max_new_tokens=n, ffn=ffn)
    return stats.decode_tokens_per_s, news[0], stats.sparsity_per_layer


def torch_model(cfg: ModelConfig, params: model.Params):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from prosparse_jax.hf.config import hf_config_from_model
    from prosparse_jax.hf.weights import to_hf_state_dict

    raw = hf_config_from_model(cfg, "llama")
    keep = {k: v for k, v in raw.items() if k in LlamaConfig().to_dict() and k not in ("torch_dtype", "dtype")}
    m = LlamaForCausalLM(LlamaConfig(**keep)).eval()
    sd = {k: torch.from_numpy(np.array(v, copy=True)) for k, v in to_hf_state_dict(cfg, params, fold=True).items()}
    m.load_state_dict(sd, strict=False)
    return m


def time_torch(m, prompt: list[int], n: int) -> tuple[float, list[int]]:
    import torch

    ids = torch.tensor([prompt])

    def run(k: int) -> tuple[float, list[int]]:
        t0 = time.perf_counter()
        with torch.no_grad():
            out = m.generate(ids, max_new_tokens=k, min_new_tokens=k, do_sample=False, pad_token_id=0)
        return time.perf_counter() - t0, out[0, len(prompt):].tolist()

    run(n)  # warm-up
    t1, _ = min(run(1) for _ in range(3))
    tn, toks = run(n)
    return (n - 1) / max(tn - t1, 1e-9), toks


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
                   help="sparse FFN backends to time (prosparse_jax.inference.sparse_ffn); the dense decode is "
                        "always timed")
    p.add_argument("--torch", action="store_true", help="also time transformers generate (dense ReLU model)")
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
    return impls


def _alternate(cfg: ModelConfig, params: Any, sparse_params: Any, prompt: list[int], impls: list[str], tm: Any,
               args: argparse.Namespace) -> tuple[dict[str, list[float]], list[float]]:
    """``args.reps`` alternating rounds of every decoder; returns (tok/s per round per name, sparsity per layer).

    Raises:
      AssertionError: a sparse backend's tokens differ from the dense decode's (a bug).
    """
    relu = cfg.replace(activation="relu", activation_threshold=0.0)
    rows: dict[str, list[float]] = {"dense": [], **{n: [] for n in impls}, "relu_dense": [], "torch_relu": []}
    time_ours(params, cfg, prompt, args.new_tokens)  # warm-up (first-call allocations)
    for name in impls:
        time_ours(sparse_params, cfg, prompt, args.new_tokens, name)
    sp: list[float] = []
    for _ in range(args.reps):
        d, toks_d, sp = time_ours(params, cfg, prompt, args.new_tokens)
        rows["dense"].append(d)
        for name in impls:
            s, toks_s, _ = time_ours(sparse_params, cfg, prompt, args.new_tokens, name)
            if toks_s != toks_d:
                raise AssertionError(f"sparse decode ({name}) emitted other tokens than dense decode")
            rows[name].append(s)
        if tm is not None:
            r, toks_r, _ = time_ours(params, relu, prompt, args.new_tokens)
            t, toks_t = time_torch(tm, prompt, args.new_tokens)
            rows["relu_dense"].append(r)
            rows["torch_relu"].append(t)
            rows.setdefault("same_tokens_as_torch", []).append(float(toks_r == toks_t))
    return rows, sp


def _run(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    impls = _check(args)
    if args.checkpoint:
        files.check_model_path(args.checkpoint, "--checkpoint")
        cfg, params, prompt = load_trained(args.checkpoint, args.prompt_len)
    else:
        cfg, params, prompt = build(args)
    sparse_params = generate.prepare_sparse_params(params)  # per-layer layout, prepared once
    tm = None
    if args.torch:
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
        tm = torch_model(cfg.replace(activation="relu", activation_threshold=0.0), params)
    params = model.unstack_layers(params)  # generate() decodes in the per-layer layout: split the layers once
    rows, sp = _alternate(cfg, params, sparse_params, prompt, impls, tm, args)
    med = {k: statistics.median(v) for k, v in rows.items() if v}
    res = {"model": args.checkpoint or "random", "shape": f"{cfg.d_model}x{cfg.d_ff}", "layers": cfg.n_layers,
           "activation": cfg.activation, "threshold": cfg.activation_threshold,
           "measured_sparsity_per_layer": sp, "decode_tokens_per_s": med,
           "over_dense": {n: med[n] / med["dense"] for n in impls}, "devices": str(jax.devices()),
           "cpus": os.cpu_count()}
    if tm is not None:
        res["ours_over_torch_dense_relu"] = med["relu_dense"] / med["torch_relu"]
    print(json.dumps(res))
    if args.out:
        files.write_text_atomic(args.out, json.dumps(res, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Returns the exit code (1 with one error line on stderr for bad input; --verbose: traceback)."""
    return common.call("bench_decode", argv, lambda: _run(argv))


if __name__ == "__main__":
    sys.exit(main())
