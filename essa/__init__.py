"""essa: align LLMs with evolution strategies over the singular values of LoRA adapters."""

__version__ = "0.1.0"
