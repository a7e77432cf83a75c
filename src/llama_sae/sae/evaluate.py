"""How good is an SAE? Reconstruction metrics on activations, and what the model loses when it runs on them.

Activation metrics (held-out rows of a store, or any batches [N, d_in]):
    FVU = Σ‖x − x̂‖² / Σ‖x − x̄‖²,  MSE, cosine(x, x̂), L0 (non-zero latents per token),
    dead latents (never fired in the evaluated tokens), dense latents (fire on > 10% of tokens),
    and the firing-frequency histogram.
Model metrics (token batches through the Llama with the SAE spliced in at its hook point):
    CE clean, CE spliced (the model runs on x̂, no error term), CE zero-ablated (the hook point set to 0),
    CE recovered = (CE_zero − CE_spliced) / (CE_zero − CE_clean), and KL(clean ‖ spliced) per position.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

from llama_sae.sae.model import SAE

DENSE_THRESHOLD = 0.1  # a latent firing on more than this fraction of tokens is "dense"


@torch.no_grad()
def activation_metrics(sae: SAE, batches: Iterable[Tensor], *, dense_threshold: float = DENSE_THRESHOLD) -> dict:
    """Reconstruction metrics of ``sae`` over batches of activations [N, d_in].

    Returns a dict: tokens, fvu, mse, cosine, l0, dead/dense counts and fractions (with thresholds),
    and ``frequency`` (per-latent firing frequency, a list of d_sae floats).
    """
    n_lat = sae.cfg.d_sae
    fires = torch.zeros(n_lat, dtype=torch.float64)
    sq_err = cos = l0 = 0.0
    sum_x_vec = torch.zeros(sae.cfg.d_in, dtype=torch.float64)
    sum_sq_vec = torch.zeros(sae.cfg.d_in, dtype=torch.float64)
    tokens = 0
    for x in batches:
        x = x.float()
        vals, idx = sae.encode_topk(x)
        x_hat = sae(x)
        active = vals > 0
        fires.index_add_(0, idx[active], torch.ones(int(active.sum()), dtype=torch.float64))
        l0 += float(active.sum())
        sq_err += float((x - x_hat).double().pow(2).sum())
        sum_x_vec += x.double().sum(0)
        sum_sq_vec += x.double().pow(2).sum(0)
        cos += float(F.cosine_similarity(x, x_hat, dim=-1).double().sum())
        tokens += x.shape[0]
    if tokens == 0:
        raise ValueError("no activations to evaluate")
    total_var = float((sum_sq_vec - sum_x_vec.pow(2) / tokens).sum())
    freq = fires / tokens
    dead, dense = int((fires == 0).sum()), int((freq > dense_threshold).sum())
    return {"tokens": tokens, "fvu": sq_err / total_var, "explained_variance": 1 - sq_err / total_var,
            "mse": sq_err / (tokens * sae.cfg.d_in), "cosine": cos / tokens, "l0": l0 / tokens,
            "dead": dead, "dead_fraction": dead / n_lat, "dead_rule": f"no activation in {tokens:,} tokens",
            "dense": dense, "dense_fraction": dense / n_lat,
            "dense_rule": f"fires on > {dense_threshold:.0%} of tokens",
            "frequency": freq.tolist()}


def _ce(logits: Tensor, tokens: Tensor, mask: Tensor) -> Tensor:
    """Next-token cross-entropy per position [B, T-1] (0 where mask is False)."""
    ce = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), tokens[:, 1:].flatten(), reduction="none")
    return ce.view(tokens.shape[0], -1) * mask[:, 1:]


@torch.no_grad()
def model_metrics(model, sae: SAE, token_batches: Iterable[tuple[Tensor, Tensor]]) -> dict:
    """CE clean / spliced / zero-ablated, CE recovered and KL, over batches of (tokens [B, T], mask [B, T]).

    ``mask`` marks real tokens (right padding is False); a position's loss counts when its target is real.
    Returns totals plus ``kl_by_position`` (mean KL at each position, for a per-position plot).
    """
    from llama_sae.splice import check_fits, spliced

    hook = check_fits(model, sae)
    sums = {"clean": 0.0, "spliced": 0.0, "zero": 0.0, "kl": 0.0}
    kl_pos = torch.zeros(0, dtype=torch.float64)
    count_pos = torch.zeros(0, dtype=torch.float64)
    n = 0.0
    for tokens, mask in token_batches:
        mask = mask.to(torch.float32)
        clean = model(tokens)
        with spliced(model, sae, error_term=False):
            recon = model(tokens)
        with model.hooked({hook: torch.zeros_like}):
            zero = model(tokens)
        sums["clean"] += float(_ce(clean, tokens, mask).sum())
        sums["spliced"] += float(_ce(recon, tokens, mask).sum())
        sums["zero"] += float(_ce(zero, tokens, mask).sum())
        logp, logq = F.log_softmax(clean.float(), -1), F.log_softmax(recon.float(), -1)
        kl = (logp.exp() * (logp - logq)).sum(-1) * mask  # [B, T]
        sums["kl"] += float(kl.sum())
        n += float(mask[:, 1:].sum())
        T = tokens.shape[1]
        if kl_pos.numel() < T:
            kl_pos = F.pad(kl_pos, (0, T - kl_pos.numel()))
            count_pos = F.pad(count_pos, (0, T - count_pos.numel()))
        kl_pos[:T] += kl.sum(0).double()
        count_pos[:T] += mask.sum(0).double()
    ce = {k: sums[k] / n for k in ("clean", "spliced", "zero")}
    recovered = (ce["zero"] - ce["spliced"]) / (ce["zero"] - ce["clean"])
    return {"ce_clean": ce["clean"], "ce_spliced": ce["spliced"], "ce_zero_ablated": ce["zero"],
            "ce_recovered": recovered, "kl": sums["kl"] / float(count_pos.sum()), "predicted_tokens": int(n),
            "kl_by_position": (kl_pos / count_pos.clamp_min(1)).tolist()}


def token_batches(tokenizer, texts: Iterable[str], *, batch_size: int = 16, max_tokens: int = 128
                  ) -> Iterable[tuple[Tensor, Tensor]]:
    """Right-padded (tokens [B, T], mask [B, T]) batches of texts, each starting with BOS."""
    batch: list[list[int]] = []

    def flush():
        T = max(len(r) for r in batch)
        tokens = torch.full((len(batch), T), tokenizer.pad_id, dtype=torch.long)
        mask = torch.zeros(len(batch), T, dtype=torch.bool)
        for i, row in enumerate(batch):
            tokens[i, :len(row)] = torch.tensor(row)
            mask[i, :len(row)] = True
        return tokens, mask

    for text in texts:
        batch.append(tokenizer.encode(text, bos=True)[:max_tokens])
        if len(batch) == batch_size:
            yield flush()
            batch = []
    if batch:
        yield flush()


def summary_rows(report: dict) -> list[tuple[str, str]]:
    """(metric, value) rows for a human-readable table of an evaluation report."""
    rows = []
    if "fvu" in report:
        rows += [("tokens", f"{report['tokens']:,}"), ("FVU", f"{report['fvu']:.4f}"),
                 ("explained variance", f"{report['explained_variance']:.4f}"), ("MSE", f"{report['mse']:.4g}"),
                 ("cosine(x, x̂)", f"{report['cosine']:.4f}"), ("L0", f"{report['l0']:.2f}"),
                 ("dead latents", f"{report['dead']} ({report['dead_fraction']:.1%}; {report['dead_rule']})"),
                 ("dense latents", f"{report['dense']} ({report['dense_fraction']:.1%}; {report['dense_rule']})")]
    if "ce_clean" in report:
        rows += [("CE clean", f"{report['ce_clean']:.4f}"), ("CE spliced", f"{report['ce_spliced']:.4f}"),
                 ("CE zero-ablated", f"{report['ce_zero_ablated']:.4f}"),
                 ("CE recovered", f"{report['ce_recovered']:.3f}"), ("KL(clean ‖ spliced)", f"{report['kl']:.4f}")]
    return rows
