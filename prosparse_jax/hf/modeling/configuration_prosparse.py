"""Configurations of prosparse_jax exports that need remote code (shipped with the weights).

``ProSparseConfig`` (``prosparse_llama``): ``prosparse_activation`` names the FFN activation (``fatrelu`` with
``hidden_act_param`` = t, ``drelu``, ...), ``neuron_thresholds`` the sparse mode's tau per layer. ``MiniCPMConfig``
(``minicpm``) adds ``scale_emb``, ``scale_depth`` and ``dim_model_base``. transformers keeps such extra keys as
attributes.
"""

from transformers import LlamaConfig


class ProSparseConfig(LlamaConfig):
    """LLaMA config with a prosparse_jax FFN activation (see module docstring)."""

    model_type = "prosparse_llama"


class MiniCPMConfig(LlamaConfig):
    """MiniCPM config (LLaMA + scale_emb / scale_depth / dim_model_base)."""

    model_type = "minicpm"
