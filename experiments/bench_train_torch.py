"""The PyTorch side of ``experiments/bench_train.py``: the reference training step and PyTorch's matmul peak.

torch and transformers are benchmark dependencies only (``requirements-test.txt``); they are imported when a bench
is built, never by the framework.
"""

from __future__ import annotations

import time


class TorchBench:
    """The same training step in PyTorch (CPU): transformers' LlamaForCausalLM with ReLU, AdamW with the same
    decay groups and clipping, and the ProSparse L1 term on the input of every down_proj (mean |x1| per layer,
    summed), on one fixed random batch. bf16 runs under autocast (fp32 master weights), like model.dtype=bfloat16."""

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
