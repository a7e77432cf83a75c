"""llama-sae's TopK SAE trainer as a ``--extra`` plugin of ../shared/peerbench/bench_peers.py.

    HF_HUB_OFFLINE=1 /tmp/peervenv/bin/python ../shared/peerbench/bench_peers.py \\
        --impls sparsify,saelens,ref_fused --extra llama_sae=benchmarks/peer_plugin.py:make_impl --repeats 3

``.step(x)`` is exactly one optimizer step of ``llama-sae train`` (``llama_sae.sae.train.train_step``) with
the trainer's defaults (layer_norm inputs, FVU + aux-k/32, AdamW with warm-up and cosine, decoder-gradient
projection and renormalization, dead-latent counters), plus turning the normalized reconstruction back into
the input space for the harness's MSE column. ``--dtype bfloat16`` runs the trainer's ``bf16=True`` (the
encoder GEMM in bf16, float32 master weights, gradients and optimizer; the harness's bf16 batch is upcast).
``--dead-frac`` marks that fraction of latents dead before every step, so the aux-k path runs. The init
seed is the harness's seed + 1: with the same seed, torch's orthogonal init would draw the very Gaussians
the harness used to make its data, and start aligned with it.
"""

from __future__ import annotations

import torch

from llama_sae.sae.model import denormalize, normalize
from llama_sae.sae.train import TrainConfig, World, init_runs_, make_runs, train_step


class LlamaSAEStep:
    """One ``llama-sae train`` run of a single SAE, stepped by the harness."""

    def __init__(self, a, x0: torch.Tensor):
        total = a.warmup + a.steps
        self.cfg = TrainConfig(d_sae=a.n_latents, k=a.k, batch_size=a.batch, tokens=a.batch * total,
                               bf16=a.dtype == "bfloat16", aux_coeff=a.auxk_alpha, seed=a.seed + 1)
        self.runs = make_runs(self.cfg, a.d_in, {}, torch.device("cpu"))
        init_runs_(self.runs, x0, self.cfg)
        g = torch.Generator().manual_seed(a.seed + 1)
        self.forced = torch.randperm(a.n_latents, generator=g)[:int(round(a.dead_frac * a.n_latents))]
        self.total, self.i = total, 0
        self.meta = {"package": "llama-sae (this repo)",
                     "classes": "llama_sae.sae.train.train_step: SAE.forward_train + SAE.backward_train_ "
                                "(sparse selection and CSR weight gradients)",
                     "optimizer": f"torch.optim.AdamW fused, lr={self.runs[0].lr:.3g}, warm-up + cosine",
                     "loss": f"fvu + {a.auxk_alpha:.4g}*auxk (OpenAI aux-k), layer_norm inputs"
                             + (", bf16 encoder GEMM" if self.cfg.bf16 else "")}

    def step(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        run = self.runs[0]
        run.since_fired[self.forced] = self.cfg.dead_tokens_threshold
        outs: list = []
        stats = train_step(self.runs, x, self.cfg, World(), self.i, self.total, x.shape[0], outs_=outs)
        self.i += 1
        _, mu, std = normalize(x, self.cfg.normalize_activations)
        return denormalize(outs[0].recon.detach(), mu, std), float(stats[0][1])


def make_impl(args, x0: torch.Tensor) -> LlamaSAEStep:
    """The harness's factory: ``args`` carries d_in, n_latents, k, batch, dtype, seed, dead_frac, auxk_alpha."""
    return LlamaSAEStep(args, x0)
