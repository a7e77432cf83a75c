"""llama-sae: sparse autoencoders for Llama 3.x language models."""

__version__ = "0.1.0"
__all__ = ["__version__"]
