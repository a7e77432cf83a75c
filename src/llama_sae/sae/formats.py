"""The SAE on disk: SAELens v6's layout, so ``sae_lens.SAE.load_from_disk(path)`` reads our SAEs and we read its.

A directory with

    cfg.json                  {"architecture": "topk", "d_in", "d_sae", "k", "dtype", "device",
                               "apply_b_dec_to_input": true, "normalize_activations": "layer_norm" | "none",
                               "reshape_activations": "none", "rescale_acts_by_decoder_norm": false,
                               "metadata": {"model_name", "hook_name", "context_size", "prepend_bos", ...}}
    sae_weights.safetensors   W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in]
    sparsity.safetensors      optional: "sparsity" [d_sae], log10 of each latent's firing rate

Our module stores W_enc latent-major ([d_sae, d_in]); it is transposed here, on the way in and out.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from llama_sae.errors import UserError
from llama_sae.fileio import atomic_write, atomic_write_json
from llama_sae.sae.model import SAE, SAEConfig

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SPARSITY_FILE = "sparsity.safetensors"
METADATA_KEYS = ("model_name", "hook_name", "context_size", "prepend_bos")


def sae_lens_cfg(cfg: SAEConfig, **metadata: Any) -> dict:
    """The cfg.json dict for ``cfg``; extra ``metadata`` (e.g. training facts) goes under "metadata"."""
    meta = {key: getattr(cfg, key) for key in METADATA_KEYS}
    meta.update(metadata)
    return {"architecture": "topk", "d_in": cfg.d_in, "d_sae": cfg.d_sae, "k": cfg.k, "dtype": "float32",
            "device": "cpu", "apply_b_dec_to_input": True, "normalize_activations": cfg.normalize_activations,
            "reshape_activations": "none", "rescale_acts_by_decoder_norm": False, "metadata": meta}


def save(sae: SAE, path: str | os.PathLike, *, sparsity: torch.Tensor | None = None, **metadata: Any) -> Path:
    """Write ``sae`` to the directory ``path`` (created if needed), each file atomically.

    Args:
        sae: the SAE (any device; written as float32 on CPU).
        path: output directory.
        sparsity: optional [d_sae] log10 firing rates, written to sparsity.safetensors.
        **metadata: extra JSON-serializable facts stored under cfg.json's "metadata".
    Returns:
        The directory.
    Example:
        >>> save(sae, "runs/sae", trained_tokens=10_000_000)
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    weights = {"W_enc": sae.W_enc.detach().T, "b_enc": sae.b_enc.detach(), "W_dec": sae.W_dec.detach(),
               "b_dec": sae.b_dec.detach()}
    weights = {name: t.float().cpu().contiguous() for name, t in weights.items()}
    atomic_write(path / WEIGHTS_FILE, safetensors_bytes(weights))
    if sparsity is not None:
        atomic_write(path / SPARSITY_FILE, safetensors_bytes({"sparsity": sparsity.float().cpu().contiguous()}))
    atomic_write_json(path / CFG_FILE, sae_lens_cfg(sae.cfg, **metadata))
    return path


def read_cfg(path: str | os.PathLike) -> tuple[SAEConfig, dict]:
    """(SAEConfig, the raw cfg.json dict) of an SAE directory, checked to be one we can run."""
    file = Path(path) / CFG_FILE
    if not file.exists():
        raise UserError(f"{path} holds no {CFG_FILE}: pass an SAE directory (SAELens v6 layout)")
    raw = json.loads(file.read_text())
    if raw.get("architecture") != "topk":
        raise UserError(f"{file}: architecture {raw.get('architecture')!r} is not supported: only 'topk' SAEs load")
    if not raw.get("apply_b_dec_to_input", True) or raw.get("rescale_acts_by_decoder_norm", False):
        raise UserError(f"{file}: apply_b_dec_to_input=false or rescale_acts_by_decoder_norm=true is not "
                        "supported: fold the decoder norms into the weights first (SAELens fold_W_dec_norm)")
    if raw.get("normalize_activations", "none") not in ("none", "layer_norm"):
        raise UserError(f"{file}: normalize_activations {raw['normalize_activations']!r} is not supported: "
                        "use 'none' or 'layer_norm'")
    meta = raw.get("metadata") or {}
    cfg = SAEConfig(d_in=raw["d_in"], d_sae=raw["d_sae"], k=raw["k"],
                    normalize_activations=raw.get("normalize_activations", "none"),
                    **{key: meta[key] for key in METADATA_KEYS if meta.get(key) is not None})
    return cfg, raw


def load(path: str | os.PathLike, device: str | torch.device = "cpu") -> SAE:
    """Load an SAE directory written by :func:`save` or by SAELens (architecture "topk").

    Args:
        path: the SAE directory (cfg.json + sae_weights.safetensors).
        device: where to put the weights (float32).
    Returns:
        The SAE in eval mode; ``sae.cfg`` holds d_in, d_sae, k, normalization and the hook point.
    Example:
        >>> sae = load("runs/sae"); latents = sae.encode(x)
    """
    cfg, _ = read_cfg(path)
    weights = load_file(Path(path) / WEIGHTS_FILE)
    shapes = {"W_enc": (cfg.d_in, cfg.d_sae), "b_enc": (cfg.d_sae,), "W_dec": (cfg.d_sae, cfg.d_in),
              "b_dec": (cfg.d_in,)}
    for name, shape in shapes.items():
        if name not in weights or tuple(weights[name].shape) != shape:
            found = tuple(weights[name].shape) if name in weights else "missing"
            raise UserError(f"{path}/{WEIGHTS_FILE}: {name} should be {shape} by cfg.json, found {found}: "
                            "the weights and cfg.json do not belong together")
    sae = SAE(cfg, device=device)
    with torch.no_grad():
        sae.W_enc.copy_(weights["W_enc"].T)
        for name in ("b_enc", "W_dec", "b_dec"):
            getattr(sae, name).copy_(weights[name])
    return sae.eval()


def load_sparsity(path: str | os.PathLike) -> torch.Tensor | None:
    """The [d_sae] log10 firing rates of an SAE directory, or None if it has no sparsity file."""
    file = Path(path) / SPARSITY_FILE
    return load_file(file)["sparsity"] if file.exists() else None
