"""Remote-code files copied into HuggingFace exports that plain ``LlamaForCausalLM`` cannot express.

They import torch and transformers (loaded with ``trust_remote_code=True``); nothing in prosparse_jax imports them.
"""

MODELING_FILES = ("configuration_prosparse.py", "modeling_prosparse.py")
