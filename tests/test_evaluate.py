"""SAE evaluation metrics against float64 recomputations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import VOCAB
from test_splice import _sae

from llama_sae.llama import load_model
from llama_sae.sae.evaluate import activation_metrics, model_metrics


def test_activation_metrics_match_float64(hf_checkpoints):
    model = load_model(hf_checkpoints["gqa-tied-f32"][1])
    sae = _sae(model, "resid_post.1")
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(50, 64, generator=g) * 3 + 1 for _ in range(3)]
    report = activation_metrics(sae, batches)
    x = torch.cat(batches).double()
    x_hat = torch.cat([sae(b) for b in batches]).double()
    fvu = ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert abs(report["fvu"] - fvu.item()) < 1e-7  # one streaming float64 pass vs two passes
    assert abs(report["cosine"] - F.cosine_similarity(x, x_hat, dim=-1).mean().item()) < 1e-6
    h = torch.cat([sae.encode(b) for b in batches])
    assert abs(report["l0"] - (h > 0).sum(1).double().mean().item()) < 1e-9
    assert report["dead"] == int(((h > 0).sum(0) == 0).sum())
    assert report["tokens"] == 150 and len(report["frequency"]) == sae.cfg.d_sae


@pytest.mark.parametrize("hook", ["resid_post.1", "resid_post.2", "attn_in.0"])  # a block later, the last, inner
def test_model_metrics_ce_and_kl(hf_checkpoints, hook):
    """Against whole forwards (no shared prefix) and float64 softmax math: the SAE and both ablations replace the
    real tokens after BOS; CE and KL average over the positions that predict a real token."""
    model = load_model(hf_checkpoints["gqa-tied-f32"][1])
    sae = _sae(model, hook)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (3, 12), generator=g)
    mask = torch.ones_like(tokens, dtype=torch.bool)
    mask[1, 8:] = False  # right padding
    mask[2, 5:] = False
    report = model_metrics(model, sae, [(tokens[:2], mask[:2]), (tokens[2:], mask[2:])])
    replaced = mask.clone()
    replaced[:, 0] = False  # BOS keeps its activation
    counted = mask[:, 1:]  # predictions of real tokens

    def mean_ce(logits):
        ce = F.cross_entropy(logits.double()[:, :-1].flatten(0, 1), tokens[:, 1:].flatten(), reduction="none")
        return ((ce.view(3, -1) * counted).sum() / counted.sum()).item()

    def replacing(new):  # the hook's activation replaced at the replaced tokens only
        return lambda x: torch.where(replaced[..., None], new(x), x)

    assert abs(report["ce_clean"] - mean_ce(model(tokens))) < 1e-5
    with model.hooked({hook: replacing(torch.zeros_like)}):
        assert abs(report["ce_zero_ablated"] - mean_ce(model(tokens))) < 1e-5
    assert report["kl"] > 0 and report["ce_spliced"] != report["ce_clean"]
    with model.hooked({hook: replacing(lambda x: sae(x).to(x.dtype))}):  # the whole forward, no shared prefix
        recon = model(tokens)
    assert abs(report["ce_spliced"] - mean_ce(recon)) < 1e-5
    logp, logq = F.log_softmax(model(tokens).double(), -1), F.log_softmax(recon.double(), -1)
    kl = (logp.exp() * (logp - logq)).sum(-1)[:, :-1]  # [B, T-1] float64: the predictions CE scores
    assert abs(report["kl"] - (kl * counted).sum().item() / counted.sum().item()) < 1e-6
    assert report["kl_by_position"][0] < 1e-9  # position 0 (BOS) is untouched and attends to itself alone
    rec = (report["ce_zero_ablated"] - report["ce_spliced"]) / (report["ce_zero_ablated"] - report["ce_clean"])
    assert abs(report["ce_recovered"] - rec) < 1e-12
    # mean ablation: the mean over all texts' real tokens after BOS (float64 here), one value for both batches
    mu = model.capture(tokens, [hook])[hook][replaced].double().mean(0).float()
    with model.hooked({hook: replacing(lambda x: mu.expand_as(x))}):
        assert abs(report["ce_mean_ablated"] - mean_ce(model(tokens))) < 1e-5
    vs_mean = (report["ce_mean_ablated"] - report["ce_spliced"]) / (report["ce_mean_ablated"] - report["ce_clean"])
    assert abs(report["ce_recovered_vs_mean"] - vs_mean) < 1e-12
    assert report["predicted_tokens"] == 11 + 7 + 4 and len(report["kl_by_position"]) == 11
    from llama_sae.sae.evaluate import hook_activations, rows_mean

    given = model_metrics(model, sae, [(tokens, mask)], mean=rows_mean(hook_activations(model, hook, [(tokens, mask)])))
    assert abs(given["ce_mean_ablated"] - report["ce_mean_ablated"]) < 1e-5  # a caller's mean: the same value
    one_batch = model_metrics(model, sae, [(tokens, mask)])  # the batching changes nothing but float rounding
    for key in ("ce_spliced", "ce_zero_ablated", "ce_mean_ablated", "kl"):
        assert abs(one_batch[key] - report[key]) < 1e-5, key


def test_model_metrics_in_logit_chunks_equal_one_chunk(hf_checkpoints, monkeypatch):
    from llama_sae.sae import evaluate

    model = load_model(hf_checkpoints["gqa-tied-f32"][1])
    sae = _sae(model, "resid_post.1")
    tokens = torch.randint(0, VOCAB, (3, 10), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(tokens, dtype=torch.bool)
    whole = model_metrics(model, sae, [(tokens, mask)])
    monkeypatch.setattr(evaluate, "LOGIT_CHUNK", VOCAB * 7)  # 7 of the 30 positions per chunk, the last one short
    assert model_metrics(model, sae, [(tokens, mask)]) == whole

