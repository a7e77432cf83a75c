"""Steering on tinyworld ground truth: does pushing a topic's latent make the model write about the topic?

The tiny model continues tinyworld's 12 neutral prompts (openings that name no topic: "The", "Yesterday,",
...), ``--samples`` sampled continuations each (temperature 0.8, top-p 0.95, to the end of the sentence, at
most 24 tokens), while one latent of the SAE is steered. Each continuation is labelled by the generator's own
labeller (``tinyworld.label_text``: the topic vocabulary, every surface form):

* on-topic: the continuation mentions the target topic (goal ≥ 80%);
* off-target: it mentions any other topic (goal ≤ 10%);
* perplexity ratio: perplexity of the continuations under the *unsteered* model, over that of unsteered
  continuations of the same prompts with the same seed (goal ≤ 1.5).

Two latents per topic: the **recovery** latent (``concept_recovery``'s best reader: the latent whose
per-sentence max best separates the topic's sentences) and the **steering** latent (of the topic's 10 best
readers by AUROC, the one whose ``add`` steer at ``--pick-strength`` does best on the selection seed). The
three kinds of edit (``bias`` before TopK, the seed's; ``clamp`` after TopK; ``add`` of the decoder direction)
run over a sweep of strengths (units of the latent's typical max activation) on the prompt's tokens
(``--positions``). Latent, strength and kind are chosen on one sampling seed and reported on another, so the
choice does not inflate the result. References: prompting (tinyworld's topic prompts, "The chef", "In the
kitchen,", ..., continued without steering, labelled the same way), the unsteered base rate, and the
steering latent on the generated tokens instead of the prompt's.

    python benchmarks/bench_steer.py --sae runs/demo/sae                 # 10 topics (DESIGN §5's list)
    python benchmarks/bench_steer.py --topics all --strengths 4,8,12     # all 30 topics
    python benchmarks/bench_steer.py --pick strongest                    # most on-topic, perplexity aside

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


def strongest(r: dict) -> float:
    """--pick strongest: on-topic minus off-target, whatever the perplexity."""
    return r["on_topic"] - r["off_target"]


def choose(rows: list[dict], pick: str = "fluent") -> dict:
    """The smallest strength meeting every goal; else the most on-topic within the perplexity goal (``fluent``),
    or the largest on-topic minus off-target (``strongest``)."""
    if pick == "strongest":
        return max(rows, key=lambda r: (strongest(r), -abs(r["strength"])))
    ok = [r for r in rows if meets(r)]
    if ok:
        return min(ok, key=lambda r: abs(r["strength"]))
    fluent = [r for r in rows if r["ppl_ratio"] <= GOAL_PPL] or rows
    return max(fluent, key=lambda r: (r["on_topic"], -r["off_target"]))


DEFAULT_TOPICS = "diplomacy,football,cooking,astronomy,medicine,finance,programming,weather,music,law"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sae", help="SAE directory trained on the tiny model; default: the shipped one")
    ap.add_argument("--features", help="features artifact of the SAE (units); default: a quick estimate")
    ap.add_argument("--topics", default=DEFAULT_TOPICS, help="'all' or a comma list of topics")
    ap.add_argument("--strengths", default="4,8,12,16", help="comma list, units of typical max")
    ap.add_argument("--pick-strength", type=float, default=12.0, help="add strength that ranks the candidates")
    ap.add_argument("--candidates", type=int, default=10, help="best readers per topic tried as steering latent")
    ap.add_argument("--samples", type=int, default=4, help="sampled continuations per neutral prompt")
    ap.add_argument("--positions", default="prompt", help="all | prompt | generated")
    ap.add_argument("--pick", default="fluent", choices=["fluent", "strongest"],
                    help="how latent and strength are chosen on the selection seed: fluent (the perplexity goal "
                         "first) or strongest (on-topic minus off-target)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from llama_sae import tinyworld
    from llama_sae.llama import load_model, load_tokenizer
    from llama_sae.steer import Steering, build_steering, load_saes, match_features, parse_steers
    from llama_sae.tinyworld.recovery import concept_recovery
    from llama_sae.tinyworld.steering import (
        continuation_nll,
        label_rates,
        measure,
        pick_steering_latent,
        sample_continuations,
        topic_candidates,
    )

    info = machine_info(args.threads)
    print_machine(info)
    t0 = time.perf_counter()
    path = tinyworld.model_path()
    model, tok = load_model(path), load_tokenizer(path)
    saes, sources = load_saes(model, [args.sae or tinyworld.sae_path()])
    (hook, sae), = saes.items()
    features = match_features([args.features] if args.features else [], saes)
    base_steering = build_steering(model, tok, saes, [], sources=sources, features=features)
    units, sources = base_steering.units, base_steering.sources
    recovery = {r["concept"]: r for r in concept_recovery(model, tok, sae)["rows"] if r["kind"] == "topic"}
    topics = list(recovery) if args.topics == "all" else args.topics.split(",")
    candidates = topic_candidates(model, tok, sae, topics, n=args.candidates)
    strengths = [float(s) for s in args.strengths.split(",")]
    prompts = tinyworld.neutral_prompts()
    sampling = dict(samples=args.samples)
    select_seed, eval_seed = 0, 1

    base_ppl, base_outs = {}, {}
    for seed in (select_seed, eval_seed):
        base_outs[seed] = sample_continuations(model, tok, prompts, None, seed=seed, **sampling)
        nll, n = continuation_nll(model, base_outs[seed])
        base_ppl[seed] = math.exp(nll / n)
    # each topic's base rate on the unsteered continuations
    unsteered = {t: {**label_rates(base_outs[eval_seed], t), "ppl_ratio": 1.0} for t in topics}

    def run(steers: list[str], topic: str, seed: int, use_prompts=prompts) -> dict:
        steering = Steering(saes, parse_steers(steers), units) if steers else None
        r = measure(model, tok, use_prompts, steering, topic, seed=seed, **sampling)
        return {**r, "ppl_ratio": r["perplexity"] / base_ppl[seed]}

    def sweep_and_eval(topic: str, latent: int, which: str, kinds=KINDS) -> list[dict]:
        chosen = []
        for kind in kinds:
            rows = [{"topic": topic, "latent": latent, "which": which, "kind": kind, "strength": s,
                     **run([f"{latent}:{kind}:{s:g}:{args.positions}"], topic, select_seed)} for s in strengths]
            sweep.extend(rows)
            pick = choose(rows, args.pick)
            chosen.append({"topic": topic, "latent": latent, "which": which, "kind": kind, "strength": pick["strength"],
                           **run([f"{latent}:{kind}:{pick['strength']:g}:{args.positions}"], topic, eval_seed)})
        return chosen

    sweep, chosen, picks, prompting, other_positions = [], [], {}, {}, {}
    for topic in topics:
        rec_latent = recovery[topic]["latent"]
        steer_latent, runs = pick_steering_latent(model, tok, saes, units, topic, candidates[topic],
                                                  base_ppl[select_seed], strength=args.pick_strength,
                                                  positions=args.positions, seed=select_seed,
                                                  **({"key": strongest} if args.pick == "strongest" else {}),
                                                  **sampling)
        picks[topic] = {"recovery": rec_latent, "steering": steer_latent, "candidates": runs}
        rows = sweep_and_eval(topic, steer_latent, "steering")
        rows += sweep_and_eval(topic, rec_latent, "recovery", ("add",))
        chosen += rows
        best = next(r for r in rows if r["which"] == "steering" and r["kind"] == "add")
        other_positions[topic] = {
            pos: run([f"{steer_latent}:add:{best['strength']:g}:{pos}"], topic, eval_seed)
            for pos in ("generated", "all") if pos != args.positions}
        topic_prompts = [p for p, t in tinyworld.topic_prompts() if t == topic]
        prompting[topic] = run([], topic, eval_seed, topic_prompts)
        print(f"{topic:12s} recovery latent {rec_latent} (AUROC {recovery[topic]['auroc']:.3f}), steering latent "
              f"{steer_latent}: " + "; ".join(
                  f"{r['which'][:5]} {r['kind']} {r['strength']:g}: {r['on_topic']:.0%} on / {r['off_target']:.0%} "
                  f"off / ppl x{r['ppl_ratio']:.2f}" for r in rows)
              + f"; prompting {prompting[topic]['on_topic']:.0%}", flush=True)

    def mean(rows, key):
        return sum(r[key] for r in rows) / max(1, len(rows))

    def summary(name, rows, strength=True):
        return [name, f"{sum(meets(r) for r in rows)}/{len(rows)}", f"{mean(rows, 'on_topic'):.0%}",
                f"{mean(rows, 'off_target'):.0%}", f"{mean(rows, 'ppl_ratio'):.2f}",
                f"{mean(rows, 'strength'):.1f}" if strength else "-"]

    print()
    print(f"held-out seed: {len(topics)} topics x {len(prompts)} neutral prompts x {args.samples} samples; "
          f"steers on the {args.positions} positions, picked {args.pick}; unsteered perplexity "
          f"{base_ppl[eval_seed]:.2f}")
    table = [summary(f"steering latent, {kind}", [c for c in chosen if c["which"] == "steering" and c["kind"] == kind])
             for kind in KINDS]
    table.append(summary("recovery latent, add", [c for c in chosen if c["which"] == "recovery"]))
    for pos in ("generated", "all"):
        rows = [o[pos] for o in other_positions.values() if pos in o]
        if rows:
            table.append(summary(f"steering latent, add, {pos} positions", rows, False))
    table.append(summary("prompting (topic prompts)", list(prompting.values()), False))
    table.append(summary("unsteered (target's base rate)", list(unsteered.values()), False))
    print_table(["method", "topics meeting all 3 goals", "on-topic", "off-target", "ppl ratio", "mean strength"],
                table)
    print()
    print("strength sweep (selection seed), mean over topics")
    sweep_table = []
    for which, kinds in (("steering", KINDS), ("recovery", ("add",))):
        for kind in kinds:
            for s in strengths:
                rows = [r for r in sweep if r["which"] == which and r["kind"] == kind and r["strength"] == s]
                sweep_table.append([which, kind, f"{s:g}", f"{mean(rows, 'on_topic'):.0%}",
                                    f"{mean(rows, 'off_target'):.0%}", f"{mean(rows, 'ppl_ratio'):.2f}",
                                    f"{sum(meets(r) for r in rows)}/{len(rows)}"])
    print_table(["latent", "kind", "strength", "on-topic", "off-target", "ppl ratio", "topics meeting goals"],
                sweep_table)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    print_json({"bench": "steer", "machine": info, "sae": str(Path(args.sae or tinyworld.sae_path()).resolve()),
                "hook": hook, "units": sources[hook].get("units"), "samples": args.samples,
                "positions": args.positions, "pick": args.pick, "strengths": strengths, "base_perplexity": base_ppl,
                "picks": picks,
                "chosen": chosen, "prompting": prompting, "unsteered": unsteered, "other_positions": other_positions,
                "sweep": sweep, "seconds": time.perf_counter() - t0})


if __name__ == "__main__":
    main()
