"""Steering on tinyworld ground truth: does pushing a topic's latent make the model write about the topic?

For every planted topic, its best latent (``concept_recovery``: the latent whose per-sentence max best
separates sentences with the topic, chosen and scored on held-out sentences) is steered while the tiny
model continues tinyworld's 12 neutral prompts (openings that name no topic: "The", "Yesterday,", ...),
``--samples`` sampled continuations each (temperature 0.8, top-p 0.95, up to the end of the sentence, at most
24 tokens), steering the generated positions (``--positions``). Each continuation is labelled by the
generator's own labeller (``tinyworld.label_text``: the topic vocabulary, every surface form):

* on-topic: the continuation mentions the target topic (goal ≥ 80%);
* off-target: it mentions any other topic (goal ≤ 10%);
* perplexity ratio: perplexity of the continuations under the *unsteered* model, over that of unsteered
  continuations of the same prompts (goal ≤ 1.5).

The three kinds of edit (``bias`` before TopK, the seed's; ``clamp`` after TopK; ``add`` of the decoder
direction) run over a sweep of strengths (units of the latent's typical max activation). The strength per
topic and kind is chosen on one sampling seed (the smallest strength meeting all three goals, else the one
with the most on-topic continuations within the perplexity goal) and reported on another seed, so the
choice does not inflate the result. The reference is prompting: tinyworld's topic prompts ("The chef",
"In the kitchen,", ...), continued without steering, labelled the same way.

    python benchmarks/bench_steer.py --sae runs/demo/sae
    python benchmarks/bench_steer.py --sae runs/demo/sae --topics cooking,law --strengths 2,4,8

Prints the tables, then one JSON line with every measurement.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine_info, print_json, print_machine, print_table  # noqa: E402

KINDS = ("bias", "clamp", "add")
GOAL_ON, GOAL_OFF, GOAL_PPL = 0.8, 0.1, 1.5


def meets(r: dict) -> bool:
    return r["on_topic"] >= GOAL_ON and r["off_target"] <= GOAL_OFF and r["ppl_ratio"] <= GOAL_PPL


def choose(rows: list[dict]) -> dict:
    """The smallest strength meeting every goal; else the most on-topic within the perplexity goal."""
    ok = [r for r in rows if meets(r)]
    if ok:
        return min(ok, key=lambda r: abs(r["strength"]))
    fluent = [r for r in rows if r["ppl_ratio"] <= GOAL_PPL] or rows
    return max(fluent, key=lambda r: (r["on_topic"], -r["off_target"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sae", required=True, help="SAE directory trained on the tiny model (e.g. runs/demo/sae)")
    ap.add_argument("--features", help="features artifact of the SAE (units); default: a quick estimate")
    ap.add_argument("--topics", default="all", help="'all' or a comma list of topics")
    ap.add_argument("--strengths", default="1,2,4,6,8,10,12", help="comma list, units of typical max")
    ap.add_argument("--samples", type=int, default=4, help="sampled continuations per neutral prompt")
    ap.add_argument("--positions", default="generated", help="all | prompt | generated")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from llama_sae import tinyworld
    from llama_sae.llama import load_model, load_tokenizer
    from llama_sae.steer import Steering, build_steering, load_saes, match_features, parse_steers
    from llama_sae.tinyworld.recovery import concept_recovery
    from llama_sae.tinyworld.steering import continuation_nll, label_rates, measure, sample_continuations

    info = machine_info(args.threads)
    print_machine(info)
    t0 = time.perf_counter()
    path = tinyworld.model_path()
    model, tok = load_model(path), load_tokenizer(path)
    saes, sources = load_saes(model, [args.sae])
    (hook, sae), = saes.items()
    features = match_features([args.features] if args.features else [], saes)
    units = build_steering(model, tok, saes, [], sources=sources, features=features).units
    recovery = {r["concept"]: r for r in concept_recovery(model, tok, sae)["rows"] if r["kind"] == "topic"}
    topics = list(recovery) if args.topics == "all" else args.topics.split(",")
    strengths = [float(s) for s in args.strengths.split(",")]
    prompts = tinyworld.neutral_prompts()
    sampling = dict(samples=args.samples)
    select_seed, eval_seed = 0, 1

    def run(steers: list[str], topic: str, seed: int, use_prompts=prompts) -> dict:
        steering = Steering(saes, parse_steers(steers), units) if steers else None
        r = measure(model, tok, use_prompts, steering, topic, seed=seed, **sampling)
        r["ppl_ratio"] = r["perplexity"] / base_ppl[seed]
        return r

    base_ppl, base_outs = {}, {}
    for seed in (select_seed, eval_seed):
        base_outs[seed] = sample_continuations(model, tok, prompts, None, seed=seed, **sampling)
        nll, n = continuation_nll(model, base_outs[seed])
        base_ppl[seed] = math.exp(nll / n)
    # each topic's base rate on the unsteered continuations
    unsteered = {t: {**label_rates(base_outs[eval_seed], t), "ppl_ratio": 1.0} for t in topics}
    sweep, chosen, prompting = [], [], {}
    for topic in topics:
        latent = recovery[topic]["latent"]
        for kind in KINDS:
            rows = []
            for s in strengths:
                r = run([f"{latent}:{kind}:{s:g}:{args.positions}"], topic, select_seed)
                rows.append({"topic": topic, "latent": latent, "kind": kind, "strength": s, **r})
            sweep += rows
            pick = choose(rows)
            r = run([f"{latent}:{kind}:{pick['strength']:g}:{args.positions}"], topic, eval_seed)
            chosen.append({"topic": topic, "latent": latent, "kind": kind, "strength": pick["strength"], **r})
        topic_prompts = [p for p, t in tinyworld.topic_prompts() if t == topic]
        prompting[topic] = run([], topic, eval_seed, topic_prompts)
        last = chosen[-3:]
        print(f"{topic:13s} latent {latent:5d} (AUROC {recovery[topic]['auroc']:.3f}): " + ", ".join(
            f"{c['kind']} {c['strength']:g}: {c['on_topic']:.0%} on / {c['off_target']:.0%} off / "
            f"ppl x{c['ppl_ratio']:.2f}" for c in last)
              + f"; prompting {prompting[topic]['on_topic']:.0%}", flush=True)

    def mean(rows, key):
        return sum(r[key] for r in rows) / max(1, len(rows))

    print()
    print(f"held-out seed, {len(topics)} topics x {len(prompts)} neutral prompts x {args.samples} samples; "
          f"unsteered perplexity {base_ppl[eval_seed]:.2f}")
    table = []
    for kind in KINDS:
        rows = [c for c in chosen if c["kind"] == kind]
        table.append([kind, f"{sum(meets(r) for r in rows)}/{len(rows)}", f"{mean(rows, 'on_topic'):.0%}",
                      f"{mean(rows, 'off_target'):.0%}", f"{mean(rows, 'ppl_ratio'):.2f}",
                      f"{mean(rows, 'strength'):.1f}"])
    prompt_rows = list(prompting.values())
    table.append(["prompting (topic prompts)", f"{sum(meets(r) for r in prompt_rows)}/{len(prompt_rows)}",
                  f"{mean(prompt_rows, 'on_topic'):.0%}", f"{mean(prompt_rows, 'off_target'):.0%}",
                  f"{mean(prompt_rows, 'ppl_ratio'):.2f}", "-"])
    un_rows = list(unsteered.values())
    table.append(["unsteered (target's base rate)", f"{sum(meets(r) for r in un_rows)}/{len(un_rows)}",
                  f"{mean(un_rows, 'on_topic'):.0%}", f"{mean(un_rows, 'off_target'):.0%}", "1.00", "-"])
    print_table(["method", "topics meeting all 3 goals", "on-topic", "off-target", "ppl ratio", "mean strength"],
                table)
    print()
    print("strength sweep (selection seed), mean over topics")
    sweep_table = []
    for kind in KINDS:
        for s in strengths:
            rows = [r for r in sweep if r["kind"] == kind and r["strength"] == s]
            sweep_table.append([kind, f"{s:g}", f"{mean(rows, 'on_topic'):.0%}", f"{mean(rows, 'off_target'):.0%}",
                                f"{mean(rows, 'ppl_ratio'):.2f}", f"{sum(meets(r) for r in rows)}/{len(rows)}"])
    print_table(["kind", "strength", "on-topic", "off-target", "ppl ratio", "topics meeting goals"], sweep_table)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    print_json({"bench": "steer", "machine": info, "sae": str(Path(args.sae).resolve()), "hook": hook,
                "units": sources[hook].get("units") if not features else f"features:{args.features}",
                "samples": args.samples, "strengths": strengths, "base_perplexity": base_ppl,
                "chosen": chosen, "prompting": prompting, "unsteered": unsteered, "sweep": sweep,
                "seconds": time.perf_counter() - t0})


if __name__ == "__main__":
    main()
