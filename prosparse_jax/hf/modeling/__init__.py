"""Remote-code modeling files copied into HuggingFace exports (loaded with ``trust_remote_code=True``).

These files import torch and transformers; nothing in ``prosparse_jax`` imports them. They are plain files shipped
next to the weights so that ``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` can build
activations and MiniCPM scales that transformers' own ``LlamaForCausalLM`` cannot express.
"""

MODELING_FILES = ("configuration_prosparse.py", "modeling_prosparse.py")
