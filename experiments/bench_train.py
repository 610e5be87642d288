"""Training throughput: our jitted step vs HF transformers LlamaForCausalLM (PyTorch CPU), same shapes, AdamW.

    python experiments/bench_train.py --shapes=tiny,0.1b --out=bench.json
    python experiments/bench_train.py --shapes=tiny --dtypes=float32,bfloat16

Both sides do the same work in one process: AdamW with clipping and the loss CE + lambda * sum_l mean|x1_l| (torch
takes x1 by a forward pre-hook on ``down_proj``); repetitions alternate. Prints median tokens/s, ours / PyTorch and
MFU against the matmul peak measured in the run. ``--isa=native,avx2`` runs each ISA cap in a child process (the caps
must be set before the libraries load); ``--loop_steps=N`` adds the real train loop on the tiny config next to the
isolated step. Results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import prosparse as prosparse_configs  # noqa: E402
from prosparse_jax import files  # noqa: E402
from prosparse_jax.config import resolve  # noqa: E402
from prosparse_jax.errors import UsageError, UserError  # noqa: E402
from prosparse_jax.main import common as cli  # noqa: E402
from prosparse_jax.model.transformer import init_params  # noqa: E402
from prosparse_jax.training import optim as optim_lib  # noqa: E402
from prosparse_jax.training import schedules
from prosparse_jax.training.metrics import measure_matmul_peak  # noqa: E402
from prosparse_jax.training.sharding import make_mesh  # noqa: E402
from prosparse_jax.training.step import make_train_step, place_state  # noqa: E402

# name -> (model fields, batch, seq_len)
SHAPES = {
    "tiny": (dict(vocab_size=4096, d_model=256, n_layers=4, n_heads=4, n_kv_heads=4, d_ff=704), 8, 256),
    "0.1b": (dict(vocab_size=4096, d_model=768, n_layers=16, n_heads=6, n_kv_heads=6, head_dim=128, d_ff=1920),
             4, 256),
}


def run_config(shape: str, batch: int, seq: int, reg_factor: float, steps: int, dtype: str = "float32",
               scan_layers: bool = False):
    c = prosparse_configs.get_config("tiny")
    fields, _, _ = SHAPES[shape]
    c.model.update(fields)
    c.model.dtype = dtype
    c.model.scan_layers = scan_layers
    c.data.vocab_size = fields["vocab_size"]
    c.data.seq_len = seq
    c.train.batch_size = batch
    c.train.grad_accum = 1
    c.train.steps = steps
    c.optim.schedule = "constant"
    c.optim.warmup_steps = 0
    c.sparsity.stages = [[reg_factor, steps]]  # constant lambda > 0 from step 0
    return resolve(c)


class JaxBench:
    def __init__(self, shape: str, batch: int, seq: int, reg_factor: float, seed: int = 0,
                 dtype: str = "float32", scan_layers: bool = False) -> None:
        self.rc = rc = run_config(shape, batch, seq, reg_factor, steps=10**6, dtype=dtype, scan_layers=scan_layers)
        tx, lr_fn = optim_lib.make_optimizer(rc.optim, rc.train.steps, rc.model.d_model)
        reg_factor_fn = schedules.reg_factor_schedule(rc.sparsity.stages)
        params = jax.jit(lambda r: init_params(rc.model, r))(jax.random.key(seed))
        # placed as train.train does (per-layer layout: one parameter group per layer, unrolled; or stacked + scan)
        self.state = place_state(params, jax.jit(tx.init)(params), 0, rc.model, make_mesh())
        self.step_fn = jax.jit(make_train_step(rc, tx, lr_fn, reg_factor_fn), donate_argnums=(0,))
        rng = np.random.default_rng(seed)
        toks = rng.integers(0, rc.model.vocab_size, size=(1, batch, seq + 1), dtype=np.int32)
        self.batch = jax.device_put({
            "inputs": toks[..., :-1], "targets": toks[..., 1:],
            "segment_ids": np.ones((1, batch, seq), np.int32),
            "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (1, batch, seq)).copy(),
            "weights": np.ones((1, batch, seq), np.float32),
        })
        self.loss = None

    def run(self, n: int) -> float:
        """Runs n steps; returns the seconds they took (host blocked on the last one)."""
        if n <= 0:
            return 0.0
        t0 = time.perf_counter()
        m = None
        for _ in range(n):
            self.state, m = self.step_fn(self.state, self.batch)
        jax.block_until_ready((self.state, m))
        dt = time.perf_counter() - t0
        self.loss = float(m["loss"])
        return dt


def update_peaks(peaks: dict[str, float]) -> None:
    """Keeps the best matmul peak seen so far (a busy machine only lowers a measurement)."""

    peaks["jax"] = max(peaks.get("jax", 0.0), measure_matmul_peak(repeats=10))
    peaks["torch"] = max(peaks.get("torch", 0.0), torch_matmul_peak(repeats=10))


def bench_shape(shape: str, dtype: str, args: argparse.Namespace, peaks: dict[str, float]) -> list[dict]:
    """One row per layer layout of ``args.layouts``; our layouts and torch alternate within each repetition."""
    _, batch, seq = SHAPES[shape]
    batch = args.batch or batch
    seq = args.seq or seq
    ours: dict[str, JaxBench] = {}
    compile_s: dict[str, float] = {}
    for layout in args.layouts.split(","):
        t_c = time.perf_counter()
        ours[layout] = JaxBench(shape, batch, seq, args.reg_factor, dtype=dtype, scan_layers=layout == "scan")
        ours[layout].run(1)
        compile_s[layout] = time.perf_counter() - t_c
    first = next(iter(ours.values()))
    tb = TorchBench(first.rc, batch, seq, args.reg_factor)
    for jb in ours.values():
        jb.run(args.warmup)
    tb.run(args.warmup + 1)
    tokens = batch * seq * args.steps
    benches = [*ours.values(), tb]
    times: dict[int, list[float]] = {id(b): [] for b in benches}
    for rep in range(args.reps):
        order = benches if rep % 2 == 0 else benches[::-1]  # alternate who goes first
        for b in order:
            times[id(b)].append(tokens / b.run(args.steps))
        update_peaks(peaks)  # the peak is re-measured between repetitions; the best one is the denominator
    t = statistics.median(times[id(tb)])
    rows = []
    for layout, jb in ours.items():  # MFU is computed at the end of main(), against the best peak of the whole run
        o = statistics.median(times[id(jb)])
        rows.append({
            "shape": shape, "dtype": dtype, "layout": layout, "batch": batch, "seq_len": seq,
            "params": jb.rc.model.params_total, "flops_per_token": jb.rc.model.flops_per_token(seq),
            "lambda": args.reg_factor, "steps_per_rep": args.steps, "warmup": args.warmup, "reps": args.reps,
            "jax_compile_plus_first_step_s": compile_s[layout], "ours_tokens_per_s": o, "torch_tokens_per_s": t,
            "ratio": o / t, "ours_all": times[id(jb)], "torch_all": times[id(tb)], "ours_final_loss": jb.loss,
            "torch_final_loss": tb.loss, "torch_attn_implementation": tb.attn_impl,
        })
    return rows


ISA_ENV = {
    "native": {},
    "avx2": {"XLA_FLAGS": "--xla_cpu_max_isa=AVX2", "ATEN_CPU_CAPABILITY": "avx2",
             "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
}


def loop_row(steps: int, args: argparse.Namespace, workdir: Path) -> dict:
    """Tokens/s of the real train() loop on the tiny config, from its metrics.jsonl, next to the isolated step.

    The isolated step (tiny shape, batch 8 x 256) is timed right before and right after the loop in the same process
    (``args.reps`` repetitions of ``args.steps`` steps on each side, median), so both see the same machine state.
    """
    from prosparse_jax.training.metrics import read_metrics
    from prosparse_jax.training.train import train

    _, batch, seq = SHAPES["tiny"]
    jb = JaxBench("tiny", batch, seq, args.reg_factor)
    jb.run(1 + args.warmup)
    step_tps = [batch * seq * args.steps / jb.run(args.steps) for _ in range(args.reps)]

    c = prosparse_configs.get_config("tiny")
    c.train.steps = steps
    c.train.log_every = 10
    c.train.eval_every = 0
    c.train.eval_batches = 1
    c.train.checkpoint_every = steps
    c.train.progress_bar = False
    c.optim.warmup_steps = 0
    c.sparsity.stages = [[0.05, steps]]  # L1 term on from step 0, as in the step benchmark
    t0 = time.perf_counter()
    train(c, workdir)
    wall = time.perf_counter() - t0
    step_tps += [batch * seq * args.steps / jb.run(args.steps) for _ in range(args.reps)]
    tps = [r["tokens_per_sec"] for r in read_metrics(workdir, "train")][1:]  # the first interval holds compilation
    loop, step = statistics.median(tps), statistics.median(step_tps)
    return {"shape": "tiny", "dtype": "float32", "kind": "train() loop", "steps": steps, "wall_s": wall,
            "loop_tokens_per_s": loop, "step_tokens_per_s": step, "loop_over_step": loop / step, "loop_all": tps,
            "step_all": step_tps}


def run_isas(isas: list[str], argv: list[str], out: str) -> None:
    """Runs this script once per ISA in a child process (caps in its environment) and prints one combined table."""
    import subprocess
    import tempfile

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for isa in isas:
            child_out = Path(tmp) / f"{isa}.json"
            rest = [a for a in argv if not a.startswith(("--isa", "--out"))]
            env = dict(os.environ, **ISA_ENV[isa])
            if isa == "native":
                env.pop("XLA_FLAGS", None)
            print(f"== isa {isa}: {' '.join(f'{k}={v}' for k, v in ISA_ENV[isa].items()) or '(no caps)'}",
                  flush=True)
            done = subprocess.run([sys.executable, __file__, *rest, f"--isa_label={isa}", f"--out={child_out}"],
                                  env=env, check=False)
            if done.returncode != 0:
                raise BenchError(f"the --isa={isa} child process failed (exit code {done.returncode}); its error is "
                                 "printed above")
            results.append(json.loads(child_out.read_text()))
    print("\n== all instruction sets")
    print(f"{'isa':7} {'shape':6} {'layout':9} {'dtype':9} {'B x T':>8} {'ours tok/s':>11} {'torch tok/s':>12} "
          f"{'ours/torch':>10} {'ours MFU':>9} {'torch MFU':>10} {'peak JAX/torch GFLOP/s':>23}")
    for res in results:
        e = res["env"]
        for r in res["results"]:
            print(f"{e['isa']:7} {r['shape']:6} {r['layout']:9} {r['dtype']:9} {r['batch']:>3}x{r['seq_len']:<4} "
                  f"{r['ours_tokens_per_s']:>11.0f} {r['torch_tokens_per_s']:>12.0f} {r['ratio']:>10.2f} "
                  f"{r['ours_mfu']:>9.1%} {r['torch_mfu']:>10.1%} "
                  f"{e['peak_flops_jax'] / 1e9:>12.0f} / {e['peak_flops_torch'] / 1e9:<8.0f}")
        for r in res.get("loop", []):
            print(f"{e['isa']:7} {r['shape']:6} train() loop, {r['steps']} steps: {r['loop_tokens_per_s']:.0f} tok/s "
                  f"= {r['loop_over_step']:.1%} of the isolated step ({r['step_tokens_per_s']:.0f} tok/s)")
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        files.write_text_atomic(out, json.dumps({"isas": results}, indent=2))
        print(f"wrote {out}")


def print_table(env: dict, rows: list[dict], loop: list[dict]) -> None:
    """The human-readable table of one process's rows."""
    print(f"\nAdamW, torch threads {env['torch_threads']}, torch attention "
          f"{rows[0]['torch_attn_implementation']}; best matmul peak (1024^3) JAX {env['peak_flops_jax'] / 1e9:.0f} "
          f"GFLOP/s, torch {env['peak_flops_torch'] / 1e9:.0f} GFLOP/s; MFU vs the JAX peak; load average "
          f"{env['loadavg_start'][0]:.1f} -> {env['loadavg_end'][0]:.1f}")
    print(f"{'shape':6} {'layout':9} {'dtype':9} {'B x T':>8} {'ours tok/s':>11} {'torch tok/s':>12} "
          f"{'ours/torch':>10} {'ours MFU':>9} {'torch MFU':>10}")
    for r in rows:
        print(f"{r['shape']:6} {r['layout']:9} {r['dtype']:9} {r['batch']:>3}x{r['seq_len']:<4} "
              f"{r['ours_tokens_per_s']:>11.0f} "
              f"{r['torch_tokens_per_s']:>12.0f} {r['ratio']:>10.2f} {r['ours_mfu']:>9.1%} {r['torch_mfu']:>10.1%}")
    for r in loop:
        print(f"tiny   train() loop, {r['steps']} steps: {r['loop_tokens_per_s']:.0f} tok/s = "
              f"{r['loop_over_step']:.1%} of the isolated step")


class BenchError(UserError):
    """A benchmark step failed for a reason the user can act on (a child process, a missing library)."""


def _parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(prog="bench_train", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="tiny,0.1b", help=f"comma-separated, from {sorted(SHAPES)}")
    p.add_argument("--steps", type=int, default=5, help="timed steps per repetition")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before timing (after compilation)")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per framework (alternating); median")
    p.add_argument("--dtypes", default="float32",
                   help="comma-separated compute dtypes: float32 | bfloat16 (ours: model.dtype, fp32 master weights; "
                        "torch: autocast bf16)")
    p.add_argument("--batch", type=int, default=0, help="override the shape's batch size")
    p.add_argument("--seq", type=int, default=0, help="override the shape's sequence length")
    p.add_argument("--reg_factor", type=float, default=0.1,
                   help="L1 regularisation factor lambda (> 0 so the L1 term is computed)")
    p.add_argument("--torch_threads", type=int, default=0, help="torch threads; 0 = os.cpu_count() (as XLA)")
    p.add_argument("--out", default="", help="write the results JSON here")
    p.add_argument("--isa", default="", help="comma-separated instruction sets, each in a child process: "
                   f"{', '.join(ISA_ENV)} (empty: this process as it is)")
    p.add_argument("--isa_label", default="", help=argparse.SUPPRESS)
    p.add_argument("--layouts", default="per-layer", help="comma-separated layer layouts of our step, timed side by "
                   "side: per-layer (model.scan_layers=False, the tiny config's) | scan (stacked layers, lax.scan)")
    p.add_argument("--loop_steps", type=int, default=0, help="also time the real train() loop on the tiny config "
                   "for this many steps (0: skip)")
    return p


def _check_args(args: argparse.Namespace) -> None:
    """Every list flag and --out, before any measurement (a typo must not cost a benchmark)."""
    for flag, value, valid in (("--shapes", args.shapes, SHAPES), ("--dtypes", args.dtypes, ("float32", "bfloat16")),
                               ("--layouts", args.layouts, ("per-layer", "scan")), ("--isa", args.isa, ISA_ENV)):
        for item in value.split(",") if value else []:
            if item not in valid:
                raise UsageError(f"{flag}: unknown {item!r}; choose from {', '.join(sorted(valid))}")
    for flag, v in (("--steps", args.steps), ("--reps", args.reps)):
        if v <= 0:
            raise UsageError(f"{flag}: must be a positive integer, got {v}")
    if args.out:
        files.check_output_file(args.out, "--out")


def _run(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    _check_args(args)
    if args.isa:
        run_isas(args.isa.split(","), sys.argv[1:] if argv is None else argv, args.out)
        return 0
    try:
        import torch
        import transformers
    except ImportError as e:
        raise BenchError(f"the comparison needs torch and transformers ({e}); pip install -r "
                         "requirements-test.txt") from None

    n_threads = args.torch_threads or os.cpu_count()
    torch.set_num_threads(n_threads)
    peaks: dict[str, float] = {}
    update_peaks(peaks)
    env = {"jax": jax.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
           "cpu_count": os.cpu_count(), "jax_devices": str(jax.devices()), "torch_threads": torch.get_num_threads(),
           "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""), "isa": args.isa_label or "as-is",
           "isa_env": {k: os.environ.get(k, "") for k in ISA_ENV["avx2"]}, "peak_flops_jax_start": peaks["jax"],
           "peak_flops_torch_start": peaks["torch"], "loadavg_start": os.getloadavg()}
    print(json.dumps(env), flush=True)
    rows = []
    for shape in args.shapes.split(","):
        for dt in args.dtypes.split(","):
            for row in bench_shape(shape, dt, args, peaks):
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if not k.endswith("_all")}), flush=True)
    loop = []
    if args.loop_steps:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            loop.append(loop_row(args.loop_steps, args, Path(tmp) / "loop"))
        print(json.dumps({k: v for k, v in loop[-1].items() if not k.endswith("_all")}), flush=True)
    update_peaks(peaks)
    env.update(peak_flops_jax=peaks["jax"], peak_flops_torch=peaks["torch"], loadavg_end=os.getloadavg())
    for r in rows:
        f = r["flops_per_token"]
        r.update(ours_mfu=f * r["ours_tokens_per_s"] / peaks["jax"],
                 torch_mfu=f * r["torch_tokens_per_s"] / peaks["jax"],
                 torch_mfu_vs_torch_peak=f * r["torch_tokens_per_s"] / peaks["torch"])

    print_table(env, rows, loop)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        files.write_text_atomic(args.out, json.dumps({"env": env, "results": rows, "loop": loop}, indent=2))
        print(f"wrote {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit code (1 with one error line on stderr for bad input; --verbose: traceback)."""
    return cli.call("bench_train", argv, lambda: _run(argv))


# The PyTorch side: the reference training step and PyTorch's matmul peak (torch is imported only here).
class TorchBench:
    """The same training step in PyTorch (CPU) on one fixed random batch: LlamaForCausalLM with ReLU, AdamW.

    Same decay groups and clipping, and the ProSparse L1 term on the input of every down_proj; bf16 runs under
    autocast (fp32 master weights), like model.dtype=bfloat16.
    """

    def __init__(self, rc, batch: int, seq: int, reg_factor: float, seed: int = 0) -> None:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        m, o = rc.model, rc.optim
        torch.manual_seed(seed)
        hf_cfg = LlamaConfig(
            vocab_size=m.vocab_size, hidden_size=m.d_model, intermediate_size=m.d_ff, num_hidden_layers=m.n_layers,
            num_attention_heads=m.n_heads, num_key_value_heads=m.n_kv_heads, head_dim=m.head_dim, hidden_act="relu",
            max_position_embeddings=max(seq, 512), rms_norm_eps=m.norm_eps, rope_theta=m.rope_theta,
            attention_bias=False, mlp_bias=False, tie_word_embeddings=False, initializer_range=m.init_std,
            use_cache=False, attn_implementation="sdpa",
        )
        self.model = LlamaForCausalLM(hf_cfg).float().train()
        self.attn_impl = self.model.config._attn_implementation
        decay = [p for n, p in self.model.named_parameters() if "norm" not in n and "embed" not in n]
        no_decay = [p for n, p in self.model.named_parameters() if "norm" in n or "embed" in n]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                                      {"params": no_decay, "weight_decay": 0.0}],
                                     lr=o.lr, betas=(o.b1, o.b2), eps=o.eps, foreach=True)
        self.clip = o.clip_norm
        self.reg_factor = reg_factor
        self._l1: list = []
        for layer in self.model.model.layers:  # x1 = act(gate) * up is the input of down_proj
            layer.mlp.down_proj.register_forward_pre_hook(lambda mod, args: self._l1.append(args[0].abs().mean()))
        g = torch.Generator().manual_seed(seed)
        toks = torch.randint(0, m.vocab_size, (batch, seq + 1), generator=g)
        self.inputs, self.targets = toks[:, :-1].contiguous(), toks[:, 1:].contiguous()
        self.torch = torch
        # bf16: autocast (bf16 matmuls, fp32 master weights and optimizer), like our model.dtype=bfloat16
        self.autocast = m.dtype == "bfloat16"
        self.loss = None

    def run(self, n: int) -> float:
        """Runs n steps; returns the seconds they took."""
        if n <= 0:
            return 0.0
        torch = self.torch
        t0 = time.perf_counter()
        for _ in range(n):
            self._l1.clear()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
                logits = self.model(input_ids=self.inputs).logits
                l1 = torch.stack([x.float() for x in self._l1]).sum()
            ce = torch.nn.functional.cross_entropy(logits.float().view(-1, logits.shape[-1]), self.targets.view(-1))
            loss = ce + self.reg_factor * l1
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            if self.clip > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip, foreach=True)
            self.opt.step()
        dt = time.perf_counter() - t0
        self.loss = float(loss.detach())
        return dt


def torch_matmul_peak(n: int = 1024, repeats: int = 5) -> float:
    """PyTorch's best n x n fp32 matmul rate on this machine (FLOP/s), for the table's % of peak."""
    import torch

    a = torch.ones(n, n)
    a @ a
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


if __name__ == "__main__":
    sys.exit(main())
