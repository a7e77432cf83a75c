"""Steering on tinyworld ground truth: does pushing a topic's latent make the model write about the topic?

The tiny model continues tinyworld's 12 neutral prompts (openings that name no topic: "The", "Yesterday,",
...), ``--samples`` sampled continuations each (temperature 0.8, top-p 0.95, to the end of the sentence, at
most 24 tokens), while one latent of the SAE is steered. Each continuation is labelled by the generator's own
labeller (``tinyworld.label_text``: the topic vocabulary, every surface form):

* on-topic: the continuation mentions the target topic (goal >= 80%);
* off-target: it mentions any other topic (goal <= 10%);
* perplexity ratio: perplexity of the continuations under the *unsteered* model, over that of unsteered
  continuations of the same prompts with the same seed (goal <= 1.5).

The **steering** latent and its strength (units of the latent's typical max activation) are chosen per topic on
sampling seed 0 and every reported figure is from seed 1, so the choice does not inflate the result: each of the
topic's ``--candidates`` best readers (AUROC) is run as an ``add`` steer at ``--screen-strength``, the 3 best are
run over ``--strengths``, and the weakest of their runs that meets every goal wins, else the one with the most
room on its tightest goal (``tinyworld.steering.choose_run``; before session 13 the roomiest run won, which is how
BENCHMARKS.md's session-4 tables were chosen). The kinds compared below are each chosen so, and the best kind by
its room on the selection seed (strengths of different kinds are not comparable). Steers act on ``--positions``
(default ``last``: the last prompt token, whose output predicts the first generated word). Compared on the same
latent, each with its strength chosen the same way: the other two kinds (``clamp`` after TopK, ``bias`` before
TopK, the seed's), the prompt's tokens instead of the last one, and the generated tokens (at the chosen strength);
the **recovery** latent (``concept_recovery``'s best reader); prompting (tinyworld's topic prompts, "The chef", ...,
unsteered); the unsteered base rate.

    python benchmarks/bench_steer.py                  # the shipped SAE (resid_post.5) and its features artifact
    python benchmarks/bench_steer.py --sae runs/demo/sae_resid_post.5                     # units: a quick estimate
    python benchmarks/bench_steer.py --topics all                                         # all 30 topics

Prints a per-topic table and the comparison, then one JSON line with every measurement.
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

KINDS = ("add", "clamp", "bias")
DEFAULT_TOPICS = "diplomacy,football,cooking,astronomy,medicine,finance,programming,weather,music,law"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sae", help="SAE directory trained on the tiny model; default: the shipped one")
    ap.add_argument("--features", help="features artifact of the SAE (units); default: the shipped one for the "
                    "shipped SAE, else a quick estimate")
    ap.add_argument("--topics", default=DEFAULT_TOPICS, help="'all' or a comma list of topics")
    ap.add_argument("--strengths", default="2,3,4,6,8", help="comma list, units of typical max")
    ap.add_argument("--screen-strength", type=float, default=5.0, help="add strength that screens the candidates")
    ap.add_argument("--candidates", type=int, default=10, help="best readers per topic tried as steering latent")
    ap.add_argument("--samples", type=int, default=16, help="sampled continuations per neutral prompt")
    ap.add_argument("--positions", default="last", help="all | prompt | generated | last | last+N | prompt+N")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from llama_sae import tinyworld
    from llama_sae.llama import load_model, load_tokenizer
    from llama_sae.steer import Steering, build_steering, check_positions, load_saes, match_features, parse_steers
    from llama_sae.tinyworld.recovery import concept_recovery
    from llama_sae.tinyworld.steering import (
        continuation_nll,
        goal_margin,
        label_rates,
        measure,
        meets_goals,
        pick_steer,
        sample_continuations,
        topic_candidates,
    )

    check_positions(args.positions, "--positions")
    info = machine_info(args.threads)
    print_machine(info)
    t0 = time.perf_counter()
    path = tinyworld.model_path()
    model, tok = load_model(path), load_tokenizer(path)
    saes, sources = load_saes(model, [args.sae or tinyworld.sae_path()])
    (hook, sae), = saes.items()
    feature_paths = [args.features] if args.features else [] if args.sae else [tinyworld.features_path()]
    features = match_features(feature_paths, saes)
    base_steering = build_steering(model, tok, saes, [], sources=sources, features=features)
    units, sources = base_steering.units, base_steering.sources
    recovery = {r["concept"]: r for r in concept_recovery(model, tok, sae)["rows"] if r["kind"] == "topic"}
    topics = list(recovery) if args.topics == "all" else args.topics.split(",")
    candidates = topic_candidates(model, tok, sae, topics, n=args.candidates)
    strengths = tuple(float(s) for s in args.strengths.split(","))
    prompts = tinyworld.neutral_prompts()
    sampling = dict(samples=args.samples)
    select_seed, eval_seed = 0, 1

    base_ppl, base_outs = {}, {}
    for seed in (select_seed, eval_seed):
        base_outs[seed] = sample_continuations(model, tok, prompts, None, seed=seed, **sampling)
        nll, n = continuation_nll(model, base_outs[seed])
        base_ppl[seed] = math.exp(nll / n)
    unsteered = {t: {**label_rates(base_outs[eval_seed], t), "ppl_ratio": 1.0} for t in topics}

    def run(steers: list[str], topic: str, seed: int, use_prompts=prompts) -> dict:
        steering = Steering(saes, parse_steers(steers), units) if steers else None
        r = measure(model, tok, use_prompts, steering, topic, seed=seed, **sampling)
        return {**r, "ppl_ratio": r["perplexity"] / base_ppl[seed]}

    def pick(topic, latents, kind="add", positions=args.positions, finalists=3):
        return pick_steer(model, tok, saes, units, topic, latents, base_ppl[select_seed], strengths=strengths,
                          screen_strength=args.screen_strength, finalists=finalists, kind=kind, positions=positions,
                          seed=select_seed, **sampling)

    def held_out(topic, method, chosen):
        return {"topic": topic, "method": method, "latent": chosen["latent"], "strength": chosen["strength"],
                "spec": chosen["spec"], "select": {k: chosen[k] for k in ("on_topic", "off_target", "ppl_ratio")},
                **run([chosen["spec"]], topic, eval_seed)}

    pos = args.positions
    methods = [f"steering latent, add, {pos}", f"steering latent, clamp, {pos}", f"steering latent, bias, {pos}",
               "steering latent, add, prompt", "steering latent, add, generated", f"recovery latent, add, {pos}",
               f"steering latent, kind chosen on seed {select_seed}, {pos}"]
    results, selection = [], {}
    for topic in topics:
        best, runs = pick(topic, candidates[topic])
        latent = best["latent"]
        sweeps = {"add": runs}
        rows = [held_out(topic, methods[0], best)]
        for i, kind in ((1, "clamp"), (2, "bias")):
            chosen, sweeps[kind] = pick(topic, [latent], kind=kind)
            rows.append(held_out(topic, methods[i], chosen))
        kind_row = max(rows[:3], key=lambda r: goal_margin(r["select"]))  # the kind chosen on the selection seed
        rows.append({**kind_row, "method": methods[6], "kind": kind_row["spec"].split(":")[1]})
        if pos != "prompt":
            chosen, sweeps["prompt"] = pick(topic, [latent], positions="prompt")
            rows.append(held_out(topic, methods[3], chosen))
        rows.append({"topic": topic, "method": methods[4], "latent": latent, "strength": best["strength"],
                     **run([f"{latent}:add:{best['strength']:g}:generated"], topic, eval_seed)})
        rec_latent = recovery[topic]["latent"]
        chosen, sweeps["recovery"] = pick(topic, [rec_latent])
        rows.append(held_out(topic, methods[5], chosen))
        topic_prompts = [p for p, t in tinyworld.topic_prompts() if t == topic]
        rows.append({"topic": topic, "method": "prompting (topic prompts)", "strength": 0.0,
                     **run([], topic, eval_seed, topic_prompts)})
        rows.append({"topic": topic, "method": "unsteered (target's base rate)", "strength": 0.0, **unsteered[topic]})
        results += rows
        selection[topic] = {"recovery": rec_latent, "candidates": candidates[topic], "sweeps": sweeps}
        r, k = rows[0], rows[3]
        print(f"{topic:12s} {k['spec']:>17s} (kind chosen) held out {k['on_topic']:.0%} on / "
              f"{k['off_target']:.0%} off / ppl x{k['ppl_ratio']:.2f} {'meets' if meets_goals(k) else 'misses'}",
              flush=True)
        print(f"{topic:12s} {r['spec']:>16s}  held out {r['on_topic']:.0%} on / {r['off_target']:.0%} off / "
              f"ppl x{r['ppl_ratio']:.2f} {'meets' if meets_goals(r) else 'misses'} (selection seed "
              f"{best['on_topic']:.0%} / {best['off_target']:.0%} / x{best['ppl_ratio']:.2f})", flush=True)

    def mean(rows, key):
        return sum(r[key] for r in rows) / max(1, len(rows))

    print()
    print(f"held-out seed {eval_seed}: {len(prompts)} neutral prompts x {args.samples} samples per setting; "
          f"unsteered perplexity {base_ppl[eval_seed]:.2f}; settings chosen on seed {select_seed}")
    for method in (methods[0], methods[6]):
        print(f"\n{method}:")
        main_rows = [r for r in results if r["method"] == method]
        print_table(["topic", "steer", "on-topic", "off-target", "ppl ratio", "all 3 goals", "margin"],
                    [[r["topic"], r["spec"], f"{r['on_topic']:.0%}", f"{r['off_target']:.0%}", f"{r['ppl_ratio']:.2f}",
                      "yes" if meets_goals(r) else "no", f"{goal_margin(r):+.2f}"] for r in main_rows])
    print()
    table = []
    for method in dict.fromkeys(r["method"] for r in results):
        rows = [r for r in results if r["method"] == method]
        table.append([method, f"{sum(meets_goals(r) for r in rows)}/{len(rows)}", f"{mean(rows, 'on_topic'):.0%}",
                      f"{mean(rows, 'off_target'):.0%}", f"{mean(rows, 'ppl_ratio'):.2f}",
                      f"{mean(rows, 'strength'):.1f}"])
    print_table(["method (held-out seed, mean over topics)", "topics meeting all 3 goals", "on-topic", "off-target",
                 "ppl ratio", "mean strength"], table)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    print_json({"bench": "steer", "machine": info, "sae": str(Path(args.sae or tinyworld.sae_path()).resolve()),
                "hook": hook, "units": sources[hook].get("units"), "samples": args.samples, "positions": pos,
                "strengths": strengths, "screen_strength": args.screen_strength, "base_perplexity": base_ppl,
                "results": results, "selection": selection, "seconds": time.perf_counter() - t0})


if __name__ == "__main__":
    main()
