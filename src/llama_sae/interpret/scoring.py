"""``llama-sae score``: how well does each explanation predict where its latent fires? (Delphi-style)

- Detection (sentence level): the scorer sees the explanation and a shuffled mix of held-out activating
  sentences (the quantile samples the explainer did not see) and random non-activating ones, and says
  which would make the latent fire.
- Fuzzing (token level): the scorer sees held-out activating sentences with their activating tokens
  marked, mixed with non-activating sentences with as many tokens marked at random, and says which
  markings match the explanation.

Each gives a balanced accuracy per latent, (TPR + TNR) / 2, with a 95% normal-approximation interval
(each rate smoothed by +0.5 / +1, so an interval never has zero width). The control scores every latent
with another latent's explanation (a fixed derangement of the explained latents): it should come out
near 0.5; far from it, the scorer is guessing from something other than the explanation.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from functools import partial

import torch

from llama_sae.errors import UserError
from llama_sae.features import EXPLANATIONS_FILE, SCORES_FILE, Example, Features, hash01
from llama_sae.fileio import atomic_write
from llama_sae.interpret.backends import Backend, Request
from llama_sae.interpret.prompts import detection_prompt, fuzzing_prompt, marked, parse_answers
from llama_sae.interpret.run import Chunk, first_error, outcome_counts, run_requests

METHODS = ("detection", "fuzzing")
PROMPT_VERSION = 1


def balanced_accuracy(pred: Sequence[int], labels: Sequence[int]) -> tuple[float, float, float]:
    """(balanced accuracy, 95% CI low, high) of 0/1 predictions against 0/1 labels (both classes present)."""
    pos = [p for p, y in zip(pred, labels) if y]
    neg = [p for p, y in zip(pred, labels) if not y]
    tpr, tnr = sum(pos) / len(pos), 1 - sum(neg) / len(neg)
    sp, sn = (sum(pos) + 0.5) / (len(pos) + 1), (len(neg) - sum(neg) + 0.5) / (len(neg) + 1)
    half = 1.96 * math.sqrt(sp * (1 - sp) / len(pos) + sn * (1 - sn) / len(neg)) / 2
    ba = (tpr + tnr) / 2
    return ba, max(0.0, ba - half), min(1.0, ba + half)


def _order(n: int, latent: int, salt: int) -> list[int]:
    """A fixed pseudo-random permutation of range(n) for this latent."""
    return torch.argsort(hash01(torch.arange(n), latent, 1000 + salt)).tolist()


def _random_marks(ex: Example, count: int, latent: int) -> list[bool]:
    picks = set(_order(len(ex.tokens), latent, ex.sentence)[:max(1, count)])
    return [i in picks for i in range(len(ex.tokens))]


def derangement(latents: Sequence[int]) -> dict[int, int]:
    """latent -> another latent whose explanation its control uses (fixed, no latent maps to itself).

    One cycle through the latents in the order of a hash of each latent alone, so adding or removing a latent
    changes two pairs, not most of them (each changed pair is a control prompt sent again)."""
    keys = hash01(torch.tensor(list(latents), dtype=torch.long), 0, 7).tolist() if latents else []
    order = [lat for _, lat in sorted(zip(keys, latents))]
    return {a: order[(i + 1) % len(order)] for i, a in enumerate(order)} if len(order) > 1 else {}


def held_out(f: Features, latent: int, n: int, sample: str = "top", n_top: int = 10) -> list[Example]:
    """Activating examples the explainer did not see: the top sentences after its ``n_top`` ("top"), or
    the odd-numbered quantile samples that it was not shown, evenly across the quantiles ("quantile", also
    the fallback when the artifact keeps fewer than n_top + 2 top sentences). Empty for a latent that
    fires on too few sentences to hold any out."""
    top, quantiles = f.examples(latent, "max", n_top + n), f.examples(latent, "quantile")
    seen = {e.sentence for e in top[:n_top] + quantiles[0::2]}  # what the explainer was shown
    top = [e for e in top[n_top:] if e.sentence not in seen]
    if sample == "top" and len(top) >= 2:
        return top
    odd = [e for e in quantiles[1::2] if e.sentence not in seen]
    return odd[::max(1, len(odd) // n)][:n]


def score_requests(f: Features, explanations: dict[int, str], source: dict[int, int], *, n: int = 10,
                   control: bool = False, sample: str = "top", n_tops: dict[int, int] | None = None
                   ) -> list[Request]:
    """Detection and fuzzing requests for the latents of ``source`` (latent -> the latent whose explanation
    it is scored with: itself, or another for the control), with held-out activating examples: none of the
    ``n_tops[latent]`` top sentences (default 10) that the latent's explainer was shown."""
    out = []
    for latent in sorted(source):
        pos = held_out(f, latent, n, sample, n_top=(n_tops or {}).get(latent, 10))
        neg = f.examples(latent, "random", n=n)
        if not pos or not neg:
            continue
        text = explanations[source[latent]]
        labels = [1] * len(pos) + [0] * len(neg)
        perm = _order(len(labels), latent, 1)
        items = [(pos + neg)[i] for i in perm]
        labels = [labels[i] for i in perm]
        tag = "c" if control else "s"
        sentences = [e.text for e in items]
        prompt = detection_prompt(text, sentences)
        meta = {"labels": labels, "source": source[latent], "control": control}
        payload = {"explanation": text, "sentences": sentences}
        out.append(Request(f"{tag}d{latent}-{prompt.hash()}", prompt, latent, "detection", 200, payload, meta))
        counts = [sum(a > 0 for a in e.acts) for e in pos]
        flags = [[a > 0 for a in e.acts] if y else _random_marks(e, counts[i % len(counts)], latent)
                 for i, (e, y) in enumerate(zip(items, labels))]
        prompt = fuzzing_prompt(text, [marked(e.tokens, fl) for e, fl in zip(items, flags)])
        payload = {**payload, "items": [(e.tokens, fl) for e, fl in zip(items, flags)]}
        out.append(Request(f"{tag}f{latent}-{prompt.hash()}", prompt, latent, "fuzzing", 200, payload, meta))
    return out


def score(f: Features, backend: Backend, *, n: int = 10, sample: str = "top", control: bool = True,
          chunk: int = 2000, fresh: bool = False, retry_failed: bool = False,
          confirm: Callable[[str], bool] | None = None, threshold: float = 5.0,
          say: Callable[[str], None] = print, progress: Callable[[int, int], None] | None = None) -> dict:
    """Score every explanation in the artifact (and the shuffled control); writes scores.jsonl.

    ``chunk`` latents' prompts are built at a time. Returns {"detection": mean BA, "fuzzing": mean BA,
    "control_detection", "control_fuzzing", "latents", "scored", "unscorable" (no held-out activating or
    no non-activating sentence), "outcomes"}, with "<name>_ci" 95% intervals of the means across latents.
    """
    f.reload_explanations()
    explanations = {l: e.text for l, e in f.explanations().items()}
    if not explanations:
        raise UserError(f"{f.path} holds no explanations to score: run `llama-sae explain {f.path}` first")
    latents = sorted(explanations)
    n_tops = {r["latent"]: int(r.get("n_top", 10)) for r in f.rows(EXPLANATIONS_FILE)}

    shuffled = derangement(latents)

    chunks = []
    for ctrl in (False, True) if control else (False,):
        for i in range(0, len(latents), chunk):
            source = {l: shuffled[l] if ctrl else l for l in latents[i:i + chunk] if not ctrl or l in shuffled}
            inputs = {"control": ctrl, "source": sorted(source.items()), "n_tops": [n_tops.get(l) for l in source],
                      "explanations": [explanations[source[l]] for l in source]}  # (source follows sorted latents)
            build = partial(score_requests, f, explanations, source, n=n, control=ctrl, sample=sample, n_tops=n_tops)
            chunks.append(Chunk(inputs, len(METHODS) * len(source), build))  # latent-method pairs

    settings = {"n": n, "sample": sample, "prompt_version": PROMPT_VERSION}
    journal, ids = run_requests(f, "score", backend, chunks, settings,
                                parse=lambda req, text: parse_answers(text, len(req.get("labels", []))),
                                fresh=fresh, retry_failed=retry_failed, confirm=confirm, threshold=threshold,
                                say=say, progress=progress)
    with journal:  # still locked: another score run cannot write the file at the same time
        rows = []
        for cid in ids:
            res, req = journal.state.results.get(cid), journal.state.requests[cid]
            if res is None or res["status"] != "succeeded":
                continue
            labels = req["labels"]
            pred = parse_answers(res["text"] or "", len(labels))
            ba, lo, hi = balanced_accuracy(pred, labels)
            rows.append({"latent": req["latent"], "method": req["task"], "control": req["control"],
                         "balanced_accuracy": ba, "ci_low": lo, "ci_high": hi, "n_pos": sum(labels),
                         "n_neg": len(labels) - sum(labels), "explanation_of": req["source"],
                         "explanation": explanations.get(req["source"]), "backend": backend.name})
        atomic_write(f.path / SCORES_FILE, "".join(json.dumps(row) + "\n" for row in rows))
    f.reload_explanations()
    scored = {row["latent"] for row in rows if not row["control"]}
    summary: dict = {"latents": len(explanations), "outcomes": outcome_counts(journal, ids),
                     "first_error": first_error(journal, ids),
                     "unscorable": len(explanations) - len({journal.state.requests[c]["latent"] for c in ids}),
                     "scored": len(scored)}
    certainty = {l: e.certainty for l, e in f.explanations().items() if e.certainty is not None}
    det = {row["latent"]: row["balanced_accuracy"] for row in rows if row["method"] == "detection"
           and not row["control"] and row["latent"] in certainty}
    summary["certainty_vs_detection"] = spearman([certainty[l] for l in det], list(det.values()))
    for method in METHODS:
        for ctrl in (False, True):
            vals = [row["balanced_accuracy"] for row in rows if row["method"] == method and row["control"] == ctrl]
            name = f"control_{method}" if ctrl else method
            summary[name] = sum(vals) / len(vals) if vals else None
            summary[f"{name}_ci"] = _mean_ci(vals)
    return summary


def spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Spearman rank correlation (average ranks for ties); None below 3 pairs or for a constant input.

    Is the explainer's self-reported certainty worth anything? Compare it with the measured score.
    """
    if len(a) < 3:
        return None

    def ranks(x: Sequence[float]) -> torch.Tensor:
        t = torch.tensor(x, dtype=torch.float64)
        _, inv, counts = torch.unique(t, return_inverse=True, return_counts=True)
        upper = torch.cumsum(counts, 0).double()
        return ((upper - (counts - 1) / 2.0) - 1)[inv]  # average rank of each tie group, 0-based

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / denom if denom > 0 else None


def _mean_ci(vals: list[float]) -> tuple[float, float] | None:
    if len(vals) < 2:
        return None
    m = sum(vals) / len(vals)
    sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))
    return m - 1.96 * sd / math.sqrt(len(vals)), m + 1.96 * sd / math.sqrt(len(vals))

