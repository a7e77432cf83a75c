"""Ground truth for an SAE: which planted concepts does some latent pick out?

For each held-out sentence, each latent's activation is aggregated over the sentence's tokens (max;
BOS excluded). For each concept, the latent whose aggregate best separates sentences with the
concept from those without (AUROC) is chosen on one half of the sentences and scored on the other
half, so the score is not inflated by choosing among thousands of latents. The trivial baseline does
the same with the model's own neurons (each residual dimension, either sign) at the same hook point.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from llama_sae.tinyworld.probe import auroc


@torch.no_grad()
def sentence_activations(model, tokenizer, sae, texts: list[str], *, batch: int = 64
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sentence max over tokens of (SAE latents [N, d_sae], model neurons of either sign [N, 2·d_in]: column j
    is dimension j's max, column d_in + j the max of its negation) at the SAE's hook."""
    lat_rows, neu_rows = [], []
    for lat, neu in iter_sentence_activations(model, tokenizer, sae, texts, batch=batch):
        lat_rows.append(lat)
        neu_rows.append(neu)
    return torch.cat(lat_rows), torch.cat(neu_rows)


@torch.no_grad()
def iter_sentence_activations(model, tokenizer, sae, texts: list[str], *, batch: int = 64
                              ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """:func:`sentence_activations` one batch of sentences at a time, on the host: (latents [B, d_sae],
    neurons [B, 2·d_in]) per batch, for callers that keep a summary rather than every row."""
    from llama_sae.sae.evaluate import token_batches
    from llama_sae.splice import check_fits

    check_fits(model, sae)  # the hook exists, d_in fits, one device: a one-line error instead of a deep one
    hook = sae.cfg.hook_name
    for tokens, mask in token_batches(tokenizer, texts, batch_size=batch, max_tokens=model.args.max_seq_len):
        tokens, mask = tokens.to(model.device), mask.to(model.device)
        valid = mask.clone()
        valid[:, 0] = False  # BOS is never a feature of the sentence
        x = model.capture(tokens, [hook])[hook].float()  # [B, T, d]
        flat = x[valid]  # [M, d]
        vals, idx = sae.encode_topk(flat)  # [M, k]
        owner = valid.nonzero()[:, :1]  # [M, 1] sentence of each token row
        n = sae.cfg.d_sae  # each token's k values go straight to (its sentence, latent): no dense [M, n] latents
        lat = torch.zeros(len(tokens) * n, device=vals.device).scatter_reduce_(
            0, (owner * n + idx).flatten(), vals.flatten(), "amax").view(len(tokens), n)
        # (latents are >= 0: the zeros stand for "never fired")
        signed = torch.cat([flat, -flat], dim=1)  # a neuron may code a concept by going negative: max(-x), not -max(x)
        neu = torch.full((len(tokens), signed.shape[-1]), float("-inf"), device=flat.device).scatter_reduce_(
            0, owner.expand_as(signed), signed, "amax")
        yield lat.cpu(), neu.cpu()


def auroc_columns(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """AUROC of every column of scores [N, C] for one binary labelling [N] -> [C] (ties count half)."""
    labels = labels.bool()
    pos = scores[labels].T.contiguous()  # [C, P]
    neg = scores[~labels].T.sort(dim=1).values.contiguous()  # [C, Q]
    if pos.shape[1] == 0 or neg.shape[1] == 0:
        return torch.full((scores.shape[1],), float("nan"))
    below = torch.searchsorted(neg, pos, right=False)  # negatives strictly below each positive
    at_or_below = torch.searchsorted(neg, pos, right=True)
    wins = below.double() + 0.5 * (at_or_below - below).double()
    return wins.sum(1) / (pos.shape[1] * neg.shape[1])


def _best(scores: torch.Tensor, labels: torch.Tensor, select: torch.Tensor) -> tuple[int, float]:
    """Index of the column with the best AUROC on the ``select`` rows, and its AUROC on the other rows."""
    aurocs = auroc_columns(scores[select], labels[select])
    j = int(torch.nan_to_num(aurocs, nan=0.0).argmax())
    return j, auroc(scores[~select, j], labels[~select])


def concept_recovery(model, tokenizer, sae, *, n_sentences: int = 4000, seed: int = 7, threshold: float = 0.95
                     ) -> dict:
    """For every planted concept: the best latent, its held-out AUROC, and the best-neuron baseline.

    Returns {"rows": [{concept, kind, latent, auroc, neuron, neuron_auroc}], "recovered": fraction of
    concepts with latent AUROC ≥ threshold, "baseline_recovered": the same for neurons, "threshold"}.
    """
    from llama_sae import tinyworld

    records = tinyworld.sentences(n_sentences, seed=seed, split="heldout")
    latents, neurons = sentence_activations(model, tokenizer, sae, [r.text for r in records])
    select = torch.arange(n_sentences) % 2 == 0
    rows = []
    for c in tinyworld.concepts():
        labels = torch.tensor([c.name in r.concepts for r in records])
        for half in (labels[select], labels[~select]):  # an AUROC needs both classes in each half
            if half.all() or not half.any():
                from llama_sae.errors import UserError

                raise UserError(f"concept {c.name!r} is in too few (or too many) of the {n_sentences:,} sentences "
                                "to choose a latent on one half and score it on the other: pass more sentences "
                                "(1,000 or more; the demo uses 4,000)")
        latent, score = _best(latents, labels, select)
        neuron, n_score = _best(neurons, labels, select)
        rows.append({"concept": c.name, "kind": c.kind, "latent": latent, "auroc": score,
                     "neuron": neuron % (neurons.shape[1] // 2), "neuron_auroc": n_score})
    ok = [r["auroc"] >= threshold for r in rows]
    base = [r["neuron_auroc"] >= threshold for r in rows]
    return {"rows": rows, "recovered": sum(ok) / len(ok), "baseline_recovered": sum(base) / len(base),
            "threshold": threshold, "sentences": n_sentences}


def print_recovery(console, result: dict) -> None:
    """The table of :func:`concept_recovery`'s result (green: recovered) and its one-line summary."""
    from rich.table import Table

    table = Table("concept", "kind", "best latent", "AUROC", "best neuron (baseline)", title=(
        f"held-out AUROC of the best latent per concept (chosen on one half of {result['sentences']:,} sentences, "
        "scored on the other)"))
    for r in result["rows"]:
        mark = "green" if r["auroc"] >= result["threshold"] else "red"
        table.add_row(r["concept"], r["kind"], str(r["latent"]), f"[{mark}]{r['auroc']:.3f}[/{mark}]",
                      f"{r['neuron_auroc']:.3f}")
    console.print(table)
    console.print(f"concepts recovered (AUROC ≥ {result['threshold']}): [bold]{result['recovered']:.0%}[/bold] "
                  f"by SAE latents vs {result['baseline_recovered']:.0%} by single model neurons")
