"""The one prompt builder for explanations and scoring, and the tolerant parsers of the answers.

Output contract of the explainer: one JSON object ``{"explanation": str, "certainty": float in [0, 1]}``
(the seed project's ``{"common_semantic": str, "certainty": ...}`` is accepted too). Parsing takes the
last JSON object in the reply (models often think aloud first), accepts certainty as 0-1, 0-100 or a
percent string, and keeps the raw text whatever happens.

Sentences are shown with the activating tokens marked ``<<token>>`` and each latent's activations as
integers 0-10 (relative to the latent's largest activation among the examples shown).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass

from llama_sae.features import Example

EXPLAIN_SYSTEM = (
    "You are a meticulous interpretability researcher. You study one latent (feature) of a sparse "
    "autoencoder trained on a language model's activations, and say in a few words what it detects.")

EXPLAIN_INSTRUCTIONS = """Below are sentences on which the latent fires. In each sentence the tokens where it fires are
marked <<like this>>, and the line after it lists (token, activation) pairs with activations scaled to integers
0-10 (10 = the strongest activation shown). The top-activating sentences come first, then samples from lower
activation quantiles.

Find what the marked tokens and their contexts have in common: a topic, a word family, a grammatical form,
a piece of punctuation. Be specific and concise (at most 15 words). Name the concept, and quote a few
characteristic words.

Answer with one JSON object and nothing after it:
{"explanation": "<what the latent detects>", "certainty": <0.0-1.0, how sure you are>}"""

DETECTION_INSTRUCTIONS = """A latent of a sparse autoencoder is explained as:
"{explanation}"

For each numbered sentence below, decide whether the latent would fire on it according to the explanation.
Answer with one JSON object and nothing after it: {{"answers": [<1 or 0 for sentence 1>, <... sentence 2>, ...]}}
"""

FUZZING_INSTRUCTIONS = """A latent of a sparse autoencoder is explained as:
"{explanation}"

In each numbered sentence below some tokens are marked <<like this>>. For each sentence, decide whether the
marked tokens are the ones the explanation describes (1) or were marked at random (0).
Answer with one JSON object and nothing after it: {{"answers": [<1 or 0 for sentence 1>, <... sentence 2>, ...]}}
"""


@dataclass(frozen=True)
class Prompt:
    """A chat prompt: system text and user text (the same for every backend)."""

    system: str
    user: str

    def messages(self) -> list[dict[str, str]]:
        """OpenAI-style messages (system first)."""
        return [{"role": "system", "content": self.system}, {"role": "user", "content": self.user}]

    def hash(self) -> str:
        """sha256 hex (first 16) of the prompt: the journal's proof that a re-run sends the same request."""
        return hashlib.sha256(json.dumps([self.system, self.user]).encode()).hexdigest()[:16]

    def chars(self) -> int:
        return len(self.system) + len(self.user)


def scaled(acts: list[float], top: float) -> list[int]:
    """Activations as integers 0-10 relative to ``top`` (a positive activation never rounds to 0)."""
    if top <= 0:
        return [0] * len(acts)
    return [0 if a <= 0 else max(1, min(10, round(10 * a / top))) for a in acts]


def marked(tokens: list[str], flags: list[bool]) -> str:
    """The sentence with flagged tokens wrapped in << >> (runs of flagged tokens share one pair)."""
    out, inside = [], False
    for piece, on in zip(tokens, flags):
        if on and not inside:
            lead = len(piece) - len(piece.lstrip())
            piece = piece[:lead] + "<<" + piece[lead:]
        elif inside and not on:
            out.append(">>")
        out.append(piece)
        inside = on
    if inside:
        out.append(">>")
    return "".join(out).strip()


def example_block(i: int, ex: Example, top: float) -> str:
    """One numbered example: marked sentence and its (token, activation) pairs."""
    levels = scaled(ex.acts, top)
    pairs = ", ".join(f"({p.strip()!r}, {v})" for p, v in zip(ex.tokens, levels) if v > 0)
    return f"{i}. {marked(ex.tokens, [v > 0 for v in levels])}\n   activations: {pairs or 'none'}"


def explain_prompt(top: list[Example], quantiles: list[Example]) -> Prompt:
    """The explanation prompt for one latent: top examples, then quantile samples (highest first)."""
    shown = top + sorted(quantiles, key=lambda e: -e.activation)
    peak = max((max(e.acts, default=0.0) for e in shown), default=0.0)
    blocks = [example_block(i + 1, ex, peak) for i, ex in enumerate(shown)]
    return Prompt(EXPLAIN_SYSTEM, EXPLAIN_INSTRUCTIONS + "\n\n" + "\n".join(blocks))


def detection_prompt(explanation: str, sentences: list[str]) -> Prompt:
    """Sentence-level scoring prompt: does the latent fire on each sentence?"""
    body = "\n".join(f"{i + 1}. {s}" for i, s in enumerate(sentences))
    return Prompt(EXPLAIN_SYSTEM, DETECTION_INSTRUCTIONS.format(explanation=explanation) + "\n" + body)


def fuzzing_prompt(explanation: str, marked_sentences: list[str]) -> Prompt:
    """Token-level scoring prompt: are the marked tokens the ones the explanation describes?"""
    body = "\n".join(f"{i + 1}. {s}" for i, s in enumerate(marked_sentences))
    return Prompt(EXPLAIN_SYSTEM, FUZZING_INSTRUCTIONS.format(explanation=explanation) + "\n" + body)


# ---------------------------------------------------------------------------------------------------
# Parsing


def last_json_object(text: str, keys: tuple[str, ...] = ()) -> dict | None:
    """The last top-level JSON object in ``text`` (code fences and prose around it ignored; objects nested in
    it are part of it, not candidates), or None; with ``keys``, the last one holding any of them."""
    decoder = json.JSONDecoder()
    found, pos = None, 0
    while (start := text.find("{", pos)) != -1:
        try:
            obj, end = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            pos = start + 1
            continue
        if isinstance(obj, dict) and (not keys or any(k in obj for k in keys)):
            found = obj
        pos = end  # past the whole object: its inner braces are not objects of their own
    return found


def _certainty(value) -> float | None:
    """A certainty in [0, 1] from 0.8, "0.8", 80 or "80%"; None for anything else (over 100, NaN, text)."""
    if isinstance(value, str):
        m = re.search(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?", value)
        if m is None:
            return None
        value = float(m.group()) / (100 if "%" in value else 1)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    value = float(value)
    if value > 1:
        if value > 100:
            return None
        value /= 100
    return max(value, 0.0)


MAX_EXPLANATION_CHARS = 400  # the prompt asks for at most 15 words; a reply that rambles is cut here


def parse_explanation(text: str) -> tuple[str | None, float | None]:
    """(explanation, certainty) from a reply; explanation None when the reply breaks the contract.

    The explanation is one line (whitespace runs, newlines included, become one space: it is quoted inside the
    scoring prompts, where a newline could add numbered lines of its own) of at most MAX_EXPLANATION_CHARS
    characters (cut at a word, with "…")."""
    obj = last_json_object(text, ("explanation", "common_semantic"))
    if obj is None:
        return None, None
    expl = obj.get("explanation", obj.get("common_semantic"))
    if not isinstance(expl, str) or not expl.strip():
        return None, None
    expl = " ".join(expl.split())
    if len(expl) > MAX_EXPLANATION_CHARS:
        expl = expl[:MAX_EXPLANATION_CHARS].rsplit(" ", 1)[0] + "…"
    return expl, _certainty(obj.get("certainty"))


def parse_answers(text: str, n: int) -> list[int] | None:
    """The n 0/1 answers of a scoring reply, or None when it breaks the contract."""
    obj = last_json_object(text, ("answers",))
    answers = obj.get("answers") if obj else None
    if not isinstance(answers, list) or len(answers) != n:
        return None
    out = []
    for a in answers:
        if a in (0, 1, True, False) or a in ("0", "1"):
            out.append(int(a))
        else:
            return None
    return out
