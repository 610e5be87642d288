"""Configurations of prosparse_jax exports that need remote code (shipped with the weights).

``ProSparseConfig`` (model_type ``prosparse_llama``): a LLaMA config whose FFN activation transformers cannot
express: ``hidden_act`` names it (``fatrelu`` with ``hidden_act_param`` = threshold t, ``drelu``) and, in sparse
mode, ``neuron_thresholds`` holds one tau per layer. ``prosparse_activation`` always holds the true activation name.

``MiniCPMConfig`` (model_type ``minicpm``): additionally ``scale_emb``, ``scale_depth`` and ``dim_model_base``
(MiniCPM: embeddings * scale_emb, residual branches * scale_depth / sqrt(L), logits from h / (d / dim_model_base)).

Extra fields are stored as plain attributes (transformers keeps unknown config keys).
"""

from transformers import LlamaConfig


class ProSparseConfig(LlamaConfig):
    """LLaMA config with a prosparse_jax FFN activation (see module docstring)."""

    model_type = "prosparse_llama"


class MiniCPMConfig(LlamaConfig):
    """MiniCPM config (LLaMA + scale_emb / scale_depth / dim_model_base)."""

    model_type = "minicpm"
