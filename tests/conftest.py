"""Shared fixtures: tiny random Llama checkpoints built with transformers (the reference)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))

# Shapes that exercise every branch: MHA and GQA, tied and untied, RoPE factor 8 and 32,
# an FFN width from ffn_dim_multiplier and one without.
TINY_SHAPES = {
    "gqa-tied-f32": dict(hidden_size=64, intermediate_size=192, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, tie_word_embeddings=True, factor=32.0),
    "mha-untied-f8": dict(hidden_size=48, intermediate_size=128, num_hidden_layers=2, num_attention_heads=3,
                          num_key_value_heads=3, tie_word_embeddings=False, factor=8.0),
    "gqa-untied-mult": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=8,
                            num_key_value_heads=2, tie_word_embeddings=False, factor=8.0),
}
VOCAB = 512


def build_hf_llama(shape: str, seed: int = 0, dtype=torch.float32):
    """A random transformers LlamaForCausalLM of a TINY_SHAPES shape, with O(1) logits."""
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = dict(TINY_SHAPES[shape])
    factor = spec.pop("factor")
    cfg = LlamaConfig(
        vocab_size=VOCAB, max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
        rope_scaling={"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        initializer_range=0.15, bos_token_id=1, eos_token_id=2, **spec,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # random norm weights, so a wrong norm order cannot hide behind ones
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
    return model.to(dtype)


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory):
    """{shape: (transformers model, checkpoint dir)} saved with save_pretrained (safetensors)."""
    out = {}
    for shape in TINY_SHAPES:
        model = build_hf_llama(shape)
        path = tmp_path_factory.mktemp(shape)
        model.save_pretrained(path)
        out[shape] = (model, path)
    return out


@pytest.fixture
def one_thread():
    """One intra-op thread: small kernels, and no OpenMP stalls when the machine is busy."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
