"""Which SAE recovers the most planted tinyworld concepts? Train each configuration on a captured store, then score it.

Each spec is ``HOOK/LATENTS/K/EPOCHS``; the store must hold that hook (capture several hooks in one pass with
``llama-sae capture --hook resid_post.1 --hook resid_post.3 ...``). Training uses the demo's other settings (batch
2,048, bf16 encoder, dead after 200,000 tokens); scoring is ``concept_recovery`` (best latent per concept chosen on
one half of the held-out sentences, AUROC on the other half). One JSON line per configuration.

    llama-sae capture --model "$(python -c 'from llama_sae import tinyworld; print(tinyworld.model_path())')" \\
        --corpus tinyworld:60000 --hook resid_post.3 --tokens 600000 --out /tmp/store --context 128
    python benchmarks/sweep_concept_recovery.py --store /tmp/store --out /tmp/sweep resid_post.3/1024/32/6
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("specs", nargs="+", help="HOOK/LATENTS/K/EPOCHS")
    p.add_argument("--store", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--sentences", type=int, default=4000, help="held-out sentences for concept_recovery")
    a = p.parse_args(argv)

    from llama_sae import tinyworld
    from llama_sae.llama import load_model, load_tokenizer
    from llama_sae.sae import load
    from llama_sae.sae.train import load_config, train
    from llama_sae.tinyworld.recovery import concept_recovery

    model, tokenizer = load_model(tinyworld.model_path()), load_tokenizer(tinyworld.model_path())
    for spec in a.specs:
        hook, d_sae, k, epochs = spec.split("/")
        cfg = load_config(d_sae=int(d_sae), k=int(k), batch_size=2048, epochs=int(epochs), bf16=True, hook=hook,
                          log_every=100, checkpoint_every=1000, dead_tokens_threshold=200_000, plots=False)
        t0 = time.perf_counter()
        (sae_dir,) = train(a.store, a.out / spec.replace("/", "_"), cfg)
        seconds = time.perf_counter() - t0
        r = concept_recovery(model, tokenizer, load(sae_dir), n_sentences=a.sentences)
        missed = {row["concept"]: round(row["auroc"], 3) for row in r["rows"] if row["auroc"] < r["threshold"]}
        print(json.dumps({"spec": spec, "train_s": round(seconds), "sentences": a.sentences,
                          "recovered": round(r["recovered"], 3), "missed": missed}), flush=True)


if __name__ == "__main__":
    main()
