"""Explanations against tinyworld's ground truth: does the explanation of a concept's latent name the concept?

For each planted concept, ``tinyworld.recovery.concept_recovery`` gives the latent that best separates
sentences with the concept (held-out AUROC). For the concepts it recovers (AUROC ≥ threshold), the
explanation of that latent *names the concept* when the concept is among those its words point to
most: a topic through its vocabulary (``tinyworld.label_text``: any surface form of the topic's words)
or its name; a form through the lexicon below (its marker words and punctuation) or its name.
"""

from __future__ import annotations

import re
from collections import Counter

from llama_sae.interpret.offline import explanation_terms, words

_MONTHS = "january february march april may june july august september october november december"
_DAYS = "monday tuesday wednesday thursday friday saturday sunday"
_NUMBERS = "one two three four five six seven eight nine ten eleven twelve twenty thirty forty fifty hundred thousand"
FORM_LEXICON: dict[str, set[str]] = {
    "question": {"?", "question", "questions", "what", "who", "which", "where", "why", "how", "does", "did"},
    "negation": {"not", "n't", "never", "no", "negation", "didn't", "don't", "doesn't", "isn't", "wasn't"},
    "number": set(_NUMBERS.split()) | {"number", "numbers", "numeral", "digits"},
    "date": set(_MONTHS.split()) | set(_DAYS.split()) | {"date", "dates", "year", "month", "weekday"},
    "quotation": {'"', "quotation", "quote", "quotes", "said", "says", "wrote"},
    "past_tense": {"past", "was", "were", "did", "had"},
    "comparison": {"than", "more", "less", "comparison", "comparative"},
    "person_name": {"name", "names", "person"},
    "place_name": {"city", "country", "place", "places"},
    "plural": {"plural", "they", "are", "were", "have"},
    "imperative": {"imperative", "command", "please"},
    "conditional": {"if", "unless", "conditional"},
}
_DIGITS = re.compile(r"^\d")


def concept_votes(explanation: str) -> Counter:
    """How many of the explanation's terms point to each concept."""
    from llama_sae import tinyworld
    from llama_sae.tinyworld.world import PAST_WORDS, PERSON_NAME_WORDS, PLACE_NAMES

    votes: Counter = Counter()
    names = {c.name: c.name.replace("_", " ") for c in tinyworld.concepts()}
    low = explanation.lower()
    for concept, name in names.items():
        if re.search(rf"\b{re.escape(name)}\b", low):
            votes[concept] += 2
    for term in explanation_terms(explanation) or [w for w, _, _ in words(explanation)]:
        for topic in tinyworld.label_text(term):
            votes[topic] += 1
        for form, lexicon in FORM_LEXICON.items():
            votes[form] += term in lexicon
        votes["number"] += bool(_DIGITS.match(term)) and not (len(term) == 4 and term[:2] in ("19", "20"))
        votes["date"] += len(term) == 4 and term[:2] in ("19", "20") and term.isdigit()
        votes["past_tense"] += term in PAST_WORDS
        votes["person_name"] += term.capitalize() in PERSON_NAME_WORDS
        votes["place_name"] += term.capitalize() in PLACE_NAMES or term.title() in PLACE_NAMES
    return +votes


def names_concept(explanation: str | None, concept: str) -> bool:
    """True if ``concept`` is among the concepts the explanation points to most (ties count)."""
    if not explanation:
        return False
    votes = concept_votes(explanation)
    return bool(votes) and votes[concept] == max(votes.values())


def ground_truth_table(features, recovery: dict) -> dict:
    """Join concept recovery with explanations and scores.

    Returns {"rows": [{concept, kind, latent, auroc, explanation, names, detection, fuzzing}],
    "matched": concepts recovered, "named": fraction of them whose explanation names the concept,
    "detection": mean detection balanced accuracy over them, "scored": how many of them have a detection score
    (a latent that fires somewhere in every pool sentence has no non-activating example to score against)}.
    """
    rows = []
    for r in recovery["rows"]:
        e = features.explanation(r["latent"])
        rows.append({"concept": r["concept"], "kind": r["kind"], "latent": r["latent"], "auroc": r["auroc"],
                     "explanation": e.text if e else None, "names": names_concept(e.text if e else None,
                                                                                  r["concept"]),
                     "detection": e.detection if e else None, "fuzzing": e.fuzzing if e else None})
    matched = [r for r in rows if r["auroc"] >= recovery["threshold"]]
    det = [r["detection"] for r in matched if r["detection"] is not None]
    return {"rows": rows, "matched": len(matched), "threshold": recovery["threshold"],
            "named": sum(r["names"] for r in matched) / max(len(matched), 1),
            "detection": sum(det) / len(det) if det else None, "scored": len(det)}


def stage(console, model, tokenizer, sae, recovery: dict, out, *, sae_path: str | None = None,
          sentences: int = 10_000) -> dict:
    """The demo's interpretation stage: top sentences, offline explanations and scores, the ground-truth table.

    Returns {"features": path, "explained", "named", "matched", "detection", "fuzzing", "control_detection",
    "control_fuzzing", "rows"}.
    """
    import time

    from rich.table import Table

    from llama_sae.features import build_features, load_features
    from llama_sae.interpret import explain, make_backend, score

    console.rule("[bold]9. interpret: top sentences, offline explanations, detection / fuzzing")
    t0 = time.perf_counter()
    path = build_features(model, tokenizer, sae, f"tinyworld:{sentences}:heldout", out / "features",
                          sentences=sentences, sae_path=sae_path)
    f = load_features(path)
    t1 = time.perf_counter()
    explained = explain(f, make_backend("offline", f), say=console.print)
    scores = score(f, make_backend("offline", f), say=console.print)
    t2 = time.perf_counter()
    gt = ground_truth_table(f, recovery)
    table = Table("concept", "latent", "AUROC", "names it", "detection", "explanation (offline)",
                  title="each concept's best latent, its offline explanation and its detection score")
    room = max(20, console.width - 62)  # the other columns take about 62 characters
    for r in gt["rows"]:
        expl = r["explanation"] or "-"
        expl = expl if len(expl) <= room else expl[:room - 1] + "…"
        table.add_row(r["concept"], str(r["latent"]), f"{r['auroc']:.3f}",
                      "[green]yes[/green]" if r["names"] else "[red]no[/red]",
                      "-" if r["detection"] is None else f"{r['detection']:.2f}", expl)
    console.print(table)
    console.print(f"{f.meta['sentences']:,} sentences in {t1 - t0:.0f} s; {explained['explained']:,} live latents "
                  f"explained and scored in {t2 - t1:.0f} s (offline)")
    console.print(f"concepts recovered (AUROC ≥ {gt['threshold']}): {gt['matched']}; their explanation names the "
                  f"concept: [bold]{gt['named']:.0%}[/bold] (goal ≥ 80%); detection on them: "
                  f"[bold]{gt['detection'] or 0:.3f}[/bold] (goal ≥ 0.90"
                  + ("" if gt["scored"] == gt["matched"] else f"; {gt['scored']} of them scorable") + ")")
    console.print(f"all live latents: detection {scores['detection']:.3f}, fuzzing {scores['fuzzing']:.3f}; shuffled "
                  f"control: detection {scores['control_detection']:.3f}, fuzzing {scores['control_fuzzing']:.3f} "
                  "(should be 0.5 ± 0.05)")
    return {"features": str(path), "explained": explained["explained"],
            **{k: gt[k] for k in ("named", "matched", "detection", "scored", "rows")},
            "all_detection": scores["detection"], "fuzzing": scores["fuzzing"],
            "control_detection": scores["control_detection"], "control_fuzzing": scores["control_fuzzing"]}
