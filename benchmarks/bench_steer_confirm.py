"""Re-measure the steers bench_steer.py chose, on sampling seeds it never saw: does each topic still meet the goals?

bench_steer.py chooses every setting on seed 0 and reports seed 1. This script reads its JSON line (the last
line of its output), takes one method's chosen steer per topic (default: the ``add`` steer on the last prompt
token), and measures it again with the same SAE, units and protocol on ``--seeds`` (neither 0 nor 1), each
against the unsteered continuations of that seed. Units come from the features artifact the bench used
(``--features``), else from the quick estimate (whose statistic changed in session 4: re-run older logs' bench).

    python benchmarks/bench_steer.py --sae SAE | tee steer.log
    python benchmarks/bench_steer_confirm.py steer.log --seeds 2,3

Prints a per-topic table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine_info, print_json, print_machine, print_table  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("bench_output", help="bench_steer.py's output (its last JSON line is read)")
    ap.add_argument("--method", default="steering latent, add, last", help="the bench method whose steers to re-run")
    ap.add_argument("--seeds", default="2,3", help="comma list of sampling seeds")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lines = [line for line in Path(args.bench_output).read_text().splitlines() if line.startswith("{")]
    if not lines:
        sys.exit(f"error: {args.bench_output} holds no JSON line: pass bench_steer.py's output")
    bench = json.loads(lines[-1])
    chosen = {r["topic"]: r for r in bench["results"] if r["method"] == args.method}
    if not chosen:
        sys.exit(f"error: no method {args.method!r} in {args.bench_output}")

    from llama_sae import tinyworld
    from llama_sae.llama import load_model, load_tokenizer
    from llama_sae.steer import Steering, build_steering, load_saes, match_features, parse_steers
    from llama_sae.tinyworld.steering import continuation_nll, measure, meets_goals, sample_continuations

    info = machine_info(args.threads)
    print_machine(info)
    t0 = time.perf_counter()
    path = tinyworld.model_path()
    model, tok = load_model(path), load_tokenizer(path)
    saes, sources = load_saes(model, [bench["sae"]])
    source = bench.get("units") or ""  # the bench's units: its features artifact, or the quick estimate
    features = match_features([source.removeprefix("features:")], saes) if source.startswith("features:") else None
    units = build_steering(model, tok, saes, [], sources=sources, features=features).units
    prompts, samples = tinyworld.neutral_prompts(), bench["samples"]
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        nll, n = continuation_nll(model, sample_continuations(model, tok, prompts, None, samples=samples, seed=seed))
        base = math.exp(nll / n)
        for topic, r in chosen.items():
            m = measure(model, tok, prompts, Steering(saes, parse_steers([r["spec"]]), units), topic, seed=seed,
                        samples=samples)
            rows.append({"topic": topic, "spec": r["spec"], "seed": seed, "on_topic": m["on_topic"],
                         "off_target": m["off_target"], "ppl_ratio": m["perplexity"] / base})
            print(f"seed {seed} {topic:12s} {r['spec']:>18s} {m['on_topic']:.0%} on / {m['off_target']:.0%} off / "
                  f"ppl x{rows[-1]['ppl_ratio']:.2f}", flush=True)
    print()
    print_table(["topic", "steer", "seed", "on-topic", "off-target", "ppl ratio", "all 3 goals"],
                [[r["topic"], r["spec"], r["seed"], f"{r['on_topic']:.0%}", f"{r['off_target']:.0%}",
                  f"{r['ppl_ratio']:.2f}", "yes" if meets_goals(r) else "no"] for r in rows])
    met = sum(meets_goals(r) for r in rows)
    print(f"\n{met}/{len(rows)} (topic, seed) pairs meet all three goals; total {time.perf_counter() - t0:.0f} s")
    print_json({"bench": "steer_confirm", "machine": info, "source": str(Path(args.bench_output).resolve()),
                "method": args.method, "samples": samples, "rows": rows, "met": met})


if __name__ == "__main__":
    main()
