"""Llama 3.x in pure PyTorch: model, checkpoints, tokenizers and generation.

    from llama_sae.llama import load_model, load_tokenizer, generate
    model = load_model("path/to/Llama-3.2-3B")          # Meta or Hugging Face format
    tok = load_tokenizer("path/to/Llama-3.2-3B")
    print(generate(model, tok, "The capital of France is", max_new_tokens=8)[0].text)
"""

from llama_sae.llama.checkpoint import load_model
from llama_sae.llama.generate import Completion, StreamChunk, generate
from llama_sae.llama.model import HOOK_KINDS, ModelArgs, Transformer, preset
from llama_sae.llama.tokenizer import load_tokenizer

__all__ = ["HOOK_KINDS", "Completion", "ModelArgs", "StreamChunk", "Transformer", "generate", "load_model",
           "load_tokenizer", "preset"]
