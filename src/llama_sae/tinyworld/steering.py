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


GOAL_ON, GOAL_OFF, GOAL_PPL = 0.8, 0.1, 1.5  # issue 9: on-topic >= 80%, off-target <= 10%, perplexity <= 1.5x


def meets_goals(r: dict) -> bool:
    """Whether a run (with ``ppl_ratio``) meets all three steering goals."""
    return r["on_topic"] >= GOAL_ON and r["off_target"] <= GOAL_OFF and r["ppl_ratio"] <= GOAL_PPL


def goal_margin(r: dict) -> float:
    """The room a run leaves on its tightest goal, each goal scaled by its range (on-topic 80-100%, off-target
    10-0%, perplexity ratio 1.5-1.0): > 0 exactly when all three are met, and the run to prefer when choosing
    settings, since it is the one least likely to miss a goal on another seed."""
    return min((r["on_topic"] - GOAL_ON) / (1 - GOAL_ON), (GOAL_OFF - r["off_target"]) / GOAL_OFF,
               (GOAL_PPL - r["ppl_ratio"]) / (GOAL_PPL - 1))


def pick_steer(model, tokenizer, saes: dict, units: dict, topic: str, candidates: list[int], base_perplexity: float,
               *, strengths: tuple[float, ...] = (2, 3, 4, 6, 8), screen_strength: float = 5.0,
               finalists: int = 3, kind: str = "add", positions: str = "last", seed: int = 0, key=goal_margin,
               **sampling) -> tuple[dict, list[dict]]:
    """The steer (latent and strength) that best makes neutral prompts about ``topic``: every candidate is run at
    ``screen_strength``, the ``finalists`` best (by ``key`` of the run, default :func:`goal_margin`) over
    ``strengths``, and :func:`choose_run` picks among the finalists' runs. Returns it (with ``latent``,
    ``strength``, ``spec``) and every run. Choose on one sampling seed and report on another: the choice
    inflates the figures of its own seed."""
    from llama_sae.steer import Steering, parse_steers

    def run(latent: int, strength: float, stage: str) -> dict:
        spec = f"{latent}:{kind}:{strength:g}:{positions}"
        r = measure(model, tokenizer, tinyworld.neutral_prompts(), Steering(saes, parse_steers([spec]), units),
                    topic, seed=seed, **sampling)
        return {"latent": latent, "strength": strength, "spec": spec, "stage": stage, **r,
                "ppl_ratio": r["perplexity"] / base_perplexity}

    screen = [run(latent, screen_strength, "screen") for latent in candidates]
    runs = list(screen)
    chosen = sorted(screen, key=key, reverse=True)[:finalists]
    for first in chosen:
        runs += [run(first["latent"], s, "sweep") for s in strengths if s != screen_strength]
    latents = {r["latent"] for r in chosen}
    return choose_run([r for r in runs if r["latent"] in latents], key), runs


def choose_run(runs: list[dict], key=goal_margin) -> dict:
    """The weakest run (by ``abs(strength)``) that meets every goal, the larger ``key`` between equals; else the run
    with the largest ``key``. In expectation perplexity and off-target grow with the strength while on-topic
    saturates, so among runs that all meet the goals the largest margin is mostly its seed's luck: on the demo's
    law latent (12 prompts x 8 samples) margins of 0.33-0.42 at 3-8 units read perplexity x1.30-1.57 on the next
    seed, the highest at 8 units, the one the largest margin chose."""
    met = [r for r in runs if meets_goals(r)]
    return min(met, key=lambda r: (abs(r["strength"]), -key(r))) if met else max(runs, key=key)
