"""The demo's last stage: steer the tiny model toward two planted topics, write the dashboard, print the UI command."""

from __future__ import annotations

import math
import shlex
from pathlib import Path

DEMO_TOPICS = ("astronomy", "law")
# Continuations of each of the 12 neutral prompts per setting. With 4 the perplexity ratio moved by 0.2-0.5 from
# one sampling seed to the next (BENCHMARKS.md, issue 9); 8 halves the variance at twice the generation.
STEER_SAMPLES = 8


def stage(console, model, tokenizer, sae, sae_dir: Path, features_path: Path, out: Path, *,
          topics: tuple[str, ...] = DEMO_TOPICS, strengths: tuple[float, ...] = (3.0, 4.0, 5.0, 6.0, 8.0),
          steer_sae=None, samples: int = STEER_SAMPLES) -> dict:
    """Steer ``topics`` (each through the steer on the last prompt token, among its 3 best readers screened at 5
    units and the best one's ``strengths``: the weakest that meets the three goals, see
    :func:`llama_sae.tinyworld.steering.choose_run`; ``samples`` continuations of
    each neutral prompt per setting), show unsteered vs steered text and the on-topic rates,
    write the dashboard of ``sae`` under out/dashboard. ``steer_sae`` (default ``sae``) is the SAE steered; its
    units come from ``sae``'s features artifact when it is ``sae``, else from a quick estimate. Returns the
    figures for report.json."""
    from rich.table import Table

    from llama_sae import tinyworld
    from llama_sae.features import load_features
    from llama_sae.steer import Steering, build_steering, generate, parse_steers
    from llama_sae.tinyworld.steering import (
        continuation_nll,
        label_rates,
        measure,
        meets_goals,
        pick_steer,
        sample_continuations,
        topic_candidates,
    )
    from llama_sae.ui.dashboard import write_dashboard

    console.rule("[bold]10 (continued). steer a topic's latent; the dashboard; the UI")
    features = load_features(features_path)
    steer_sae = steer_sae or sae
    hook = steer_sae.cfg.hook_name
    saes = {hook: steer_sae}
    own = steer_sae is sae  # the features artifact describes sae's latents only
    units = build_steering(model, tokenizer, saes, [], features={hook: features} if own else None).units
    prompts = tinyworld.neutral_prompts()

    def unsteered(seed: int):  # continuations and perplexity; seed 0 chooses the steers, seed 1 shows them
        outs = sample_continuations(model, tokenizer, prompts, None, samples=samples, seed=seed)
        nll, n = continuation_nll(model, outs)
        return outs, math.exp(nll / n)

    (_, select_ppl), (held_out, held_out_ppl) = unsteered(0), unsteered(1)  # generated once, for every topic
    candidates = topic_candidates(model, tokenizer, steer_sae, list(topics), n=3, n_sentences=600)
    shown = prompts[:4]
    plain = generate(model, tokenizer, shown, None, max_new_tokens=16)
    results = {}
    for topic in topics:
        best, _ = pick_steer(model, tokenizer, saes, units, topic, candidates[topic], select_ppl, strengths=strengths,
                             finalists=1, positions="last", samples=samples, seed=0)  # chosen on seed 0, shown on 1
        latent, spec = best["latent"], best["spec"]
        steering = Steering(saes, parse_steers([spec]), units)
        steered = generate(model, tokenizer, shown, steering, max_new_tokens=16)
        r = measure(model, tokenizer, prompts, steering, topic, samples=samples, seed=1)
        r0 = label_rates(held_out, topic)
        e = features.explanation(latent) if own else None
        table = Table("prompt", "unsteered", f"steered --steer {hook}@{spec}",
                      title=f"{topic}: latent {latent} of the SAE at {hook}" + (f" ({e.text[:60]})" if e else ""))
        for p, a, b in zip(shown, plain, steered):
            table.add_row(p, a.text, b.text)
        console.print(table)
        console.print(f"{topic}: {r['on_topic']:.0%} of sampled continuations of the 12 neutral prompts mention it "
                      f"(unsteered {r0['on_topic']:.0%}); other topics {r['off_target']:.0%}; perplexity under the "
                      f"unsteered model x{r['perplexity'] / held_out_ppl:.2f}")
        results[topic] = {"hook": hook, "latent": latent, "spec": spec, "on_topic": r["on_topic"],
                          "off_target": r["off_target"], "unsteered_on_topic": r0["on_topic"],
                          "ppl_ratio": r["perplexity"] / held_out_ppl}
        results[topic]["meets_goals"] = meets_goals(results[topic])
        console.print(f"  goals (>= 80% on-topic, <= 10% other topics, perplexity <= x1.5): "
                      f"{'all met' if results[topic]['meets_goals'] else 'not all met'}")
    index = write_dashboard(out / "dashboard", features, sae, model, tokenizer)
    console.print(f"dashboard ({len(features.live_latents()):,} latents): {index.resolve()} (opens from disk)")
    command = f"llama-sae ui --sae {shlex.quote(str(sae_dir))} --features {shlex.quote(str(features_path))}"
    console.print(f"chat with the model and steer it in the browser: [bold]{command}[/bold] "
                  "(then open http://127.0.0.1:7860)", soft_wrap=True)
    return {"topics": results, "dashboard": str(index), "ui": command}
