"""LLaMA / MiniCPM causal LMs with the activations of prosparse_jax (shipped with exports as remote code).

A ``LlamaForCausalLM`` whose modules are swapped in place, so weight names stay LLaMA's. The MLP applies
``config.prosparse_activation`` (else ``hidden_act``): ``fatrelu`` keeps z >= t (t = ``hidden_act_param``), ``drelu``
is relu(gate) * relu(up), other names come from ``ACT2FN``; with ``neuron_thresholds`` x1_i is zeroed where
|x1_i| * ||down_proj.weight[:, i]|| <= tau. MiniCPM scales: embeddings * scale_emb, attention and MLP outputs *
scale_depth / sqrt(L), logits = lm_head(h / (hidden_size / dim_model_base)).
"""

import math

import torch
from torch import nn
from transformers import LlamaForCausalLM
from transformers.activations import ACT2FN

from .configuration_prosparse import MiniCPMConfig, ProSparseConfig


def _activation_name(config):
    return getattr(config, "prosparse_activation", None) or config.hidden_act


def _residual_scale(config):
    scale_depth = getattr(config, "scale_depth", None)
    return scale_depth / math.sqrt(config.num_hidden_layers) if scale_depth else 1.0


class ScaledLinear(nn.Linear):
    """nn.Linear whose output is multiplied by a constant (MiniCPM residual-branch scale)."""

    def __init__(self, in_features, out_features, scale):
        super().__init__(in_features, out_features, bias=False)
        self.scale = scale

    def forward(self, x):
        return super().forward(x) * self.scale


class DividedInputLinear(nn.Linear):
    """nn.Linear applied to x / divisor (MiniCPM output head)."""

    def __init__(self, in_features, out_features, divisor):
        super().__init__(in_features, out_features, bias=False)
        self.divisor = divisor

    def forward(self, x):
        return super().forward(x / self.divisor)


class ScaledEmbedding(nn.Embedding):
    """nn.Embedding whose output is multiplied by a constant (MiniCPM scale_emb)."""

    def __init__(self, num_embeddings, embedding_dim, padding_idx, scale):
        super().__init__(num_embeddings, embedding_dim, padding_idx)
        self.scale = scale

    def forward(self, ids):
        return super().forward(ids) * self.scale


class ProSparseMLP(nn.Module):
    """Gated FFN down(act(gate(x)) * up(x)) with the prosparse_jax activations and optional neuron thresholds."""

    def __init__(self, config, layer_idx):
        super().__init__()
        d, f = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = ScaledLinear(f, d, _residual_scale(config))
        self.activation = _activation_name(config)
        self.threshold = float(getattr(config, "hidden_act_param", None) or 0.0)
        taus = getattr(config, "neuron_thresholds", None)
        self.tau = float(taus[layer_idx]) if taus else None
        if self.activation not in ("fatrelu", "drelu"):
            self.act_fn = ACT2FN[self.activation]

    def forward(self, x):
        gate, up = self.gate_proj(x), self.up_proj(x)
        if self.activation == "fatrelu":  # z >= t kept (prosparse_jax convention)
            act = torch.where(gate >= self.threshold, gate, torch.zeros_like(gate))
        elif self.activation == "drelu":
            act, up = torch.relu(gate), torch.relu(up)
        else:
            act = self.act_fn(gate)
        x1 = act * up
        if self.tau is not None:
            norms = torch.linalg.vector_norm(self.down_proj.weight.float(), dim=0)
            dropped = x1.float().abs() * norms <= self.tau  # prosparse_jax's rule, in float32 like it
            x1 = torch.where(dropped, torch.zeros_like(x1), x1)
        return self.down_proj(x1)


class ProSparseLlamaForCausalLM(LlamaForCausalLM):
    """LlamaForCausalLM with prosparse_jax activations, neuron thresholds and MiniCPM scales (module docstring)."""

    config_class = ProSparseConfig

    def __init__(self, config):
        hidden_act = config.hidden_act
        config.hidden_act = "relu"  # LlamaMLP looks the name up in ACT2FN; its MLPs are replaced below
        try:
            super().__init__(config)
        finally:
            config.hidden_act = hidden_act
        r = _residual_scale(config)
        for i, layer in enumerate(self.model.layers):
            layer.mlp = ProSparseMLP(config, i)
            if r != 1.0:
                attn = layer.self_attn
                attn.o_proj = ScaledLinear(attn.o_proj.in_features, attn.o_proj.out_features, r)
        scale_emb = getattr(config, "scale_emb", None)
        if scale_emb is not None and scale_emb != 1.0:
            self.model.embed_tokens = ScaledEmbedding(
                config.vocab_size, config.hidden_size, self.model.embed_tokens.padding_idx, scale_emb
            )
        dim_model_base = getattr(config, "dim_model_base", None)
        if dim_model_base:
            self.lm_head = DividedInputLinear(
                config.hidden_size, config.vocab_size, config.hidden_size / dim_model_base
            )
        self.post_init()


class MiniCPMForCausalLM(ProSparseLlamaForCausalLM):
    """MiniCPM causal LM (LLaMA weights and names, MiniCPM scales)."""

    config_class = MiniCPMConfig
