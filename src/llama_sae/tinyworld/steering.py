"""Does steering a topic's latent make the model write about the topic? Measured with the generator's labeller.

A run samples continuations of tinyworld's neutral prompts (openings that name no topic), each ending at
the end of its sentence, and labels each with :func:`tinyworld.label_text` (topic vocabulary, every
surface form):

* ``on_topic``: the fraction of continuations that mention the target topic;
* ``off_target``: the fraction that mention any other topic;
* ``perplexity``: of the continuations under the *unsteered* model (fluency), to be compared with the
  perplexity of unsteered continuations of the same prompts with the same seed.
"""

from __future__ import annotations

import math

import torch

from llama_sae import tinyworld


def sentence_stop_ids(tokenizer) -> set[int]:
    """The tokenizer's stop tokens and the tokens that end a sentence (".", "?", "!")."""
    ends = {t for t in range(tokenizer.vocab_size) if tokenizer.decode([t]).strip() in (".", "?", "!")}
    return set(tokenizer.stop_ids) | ends


def sample_continuations(model, tokenizer, prompts: list[str], steering, *, samples: int = 4, seed: int = 0,
                         max_new_tokens: int = 24, temperature: float = 0.8, top_p: float = 0.95) -> list:
    """``samples`` sampled one-sentence continuations of every prompt (one batch), steered by ``steering``."""
    from llama_sae.steer import generate

    batch = [p for p in prompts for _ in range(samples)]
    return generate(model, tokenizer, batch, steering, max_new_tokens=max_new_tokens, temperature=temperature,
                    top_p=top_p, seed=seed, stop_ids=sentence_stop_ids(tokenizer))


@torch.no_grad()
def continuation_nll(model, completions) -> tuple[float, int]:
    """Summed negative log-likelihood (nats) of the continuation tokens under ``model``, and their count."""
    rows = [c.prompt_tokens + c.tokens for c in completions if c.tokens]
    if not rows:
        return 0.0, 0
    T = max(len(r) for r in rows)
    tokens = torch.zeros(len(rows), T, dtype=torch.long, device=model.device)
    target = torch.zeros(len(rows), T, dtype=torch.bool, device=model.device)  # positions whose next token counts
    for i, (r, c) in enumerate(zip(rows, (c for c in completions if c.tokens))):
        tokens[i, :len(r)] = torch.tensor(r)
        target[i, len(c.prompt_tokens) - 1:len(r) - 1] = True  # right padding: causal attention never sees it
    logp = model(tokens).float().log_softmax(-1)[:, :-1]  # [B, T-1, V]
    nll = -logp.gather(-1, tokens[:, 1:, None])[..., 0]  # [B, T-1]
    mask = target[:, :-1]
    return float(nll[mask].sum()), int(mask.sum())


def label_rates(completions, topic: str) -> dict:
    """on_topic / off_target fractions of the continuations for ``topic``."""
    labels = [tinyworld.label_text(c.text) for c in completions]
    return {"on_topic": sum(topic in s for s in labels) / len(labels),
            "off_target": sum(bool(s - {topic}) for s in labels) / len(labels)}


def measure(model, tokenizer, prompts: list[str], steering, topic: str, **sampling) -> dict:
    """on_topic, off_target and perplexity (under the unsteered model) of steered continuations."""
    outs = sample_continuations(model, tokenizer, prompts, steering, **sampling)
    nll, n = continuation_nll(model, outs)
    return {**label_rates(outs, topic), "perplexity": math.exp(nll / max(n, 1)), "tokens": n,
            "examples": [c.text for c in outs[:: max(1, len(outs) // 4)]][:4]}


def topic_candidates(model, tokenizer, sae, topics: list[str], *, n: int = 10, n_sentences: int = 1000,
                     seed: int = 7) -> dict[str, list[int]]:
    """For each topic, the ``n`` latents whose per-sentence max best separates its sentences (AUROC), best first."""
    from llama_sae.tinyworld.recovery import auroc_columns, sentence_activations

    records = tinyworld.sentences(n_sentences, seed=seed, split="heldout")
    latents, _ = sentence_activations(model, tokenizer, sae, [r.text for r in records])
    out = {}
    for topic in topics:
        labels = torch.tensor([topic in r.concepts for r in records])
        out[topic] = auroc_columns(latents, labels).nan_to_num(0.0).topk(n).indices.tolist()
    return out


def steering_score(r: dict, max_ppl_ratio: float = 1.5) -> tuple:
    """Order of preference among steering runs: fluent first (perplexity ratio within the goal), then on-topic
    minus off-target."""
    return (r["ppl_ratio"] <= max_ppl_ratio, r["on_topic"] - r["off_target"])


def pick_steering_latent(model, tokenizer, saes: dict, units: dict, topic: str, candidates: list[int],
                         base_perplexity: float, *, strength: float = 12.0, positions: str = "prompt",
                         seed: int = 0, key=steering_score, **sampling) -> tuple[int, list[dict]]:
    """The candidate whose ``add`` steer best makes neutral prompts about ``topic`` (by ``key`` of its run,
    default :func:`steering_score`), and every candidate's run. Choose on one seed and report on another."""
    from llama_sae.steer import Steering, parse_steers

    runs = []
    for latent in candidates:
        steering = Steering(saes, parse_steers([f"{latent}:add:{strength:g}:{positions}"]), units)
        r = measure(model, tokenizer, tinyworld.neutral_prompts(), steering, topic, seed=seed, **sampling)
        runs.append({"latent": latent, **r, "ppl_ratio": r["perplexity"] / base_perplexity})
    return max(runs, key=key)["latent"], runs
