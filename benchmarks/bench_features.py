"""Speed of the features pass (``llama_sae.features.build_features``) against the bare spliced forward.

What is measured, in one process, on the same sentences (tinyworld held-out split), the same batches
(``--batch`` sentences, right-padded, BOS first) and the same model and SAE; each number is a median over
``--repeats`` interleaved rounds:

* features: ``build_features`` end to end into a fresh directory: corpus read (a JSONL file of the
  sentences, written first: the tinyworld generator itself is slower than the model) and tokenized, the forward
  to the SAE's hook point (early exit), TopK encoding, the per-(sentence, latent) aggregates, the running
  top-N / reservoir / pool tables and the histogram (pass 1); then pass 2 over the selected sentences for
  the per-token activations; then the columnar artifact written. Also its pass 1 alone.
* spliced forward: ``with spliced(model, sae): model(tokens)``, the whole model to the logits with the SAE
  in place (what generation with the SAE costs), over the same padded batches, nothing else.
* capture + encode: ``model.capture`` to the hook and ``sae.encode_topk``: the features pass's own model work.

tokens/s counts the sentence tokens (BOS excluded) the features pass reads. The ratio features / spliced
is the headline: above 1, finding the top sentences costs less than running the model with the SAE.

Correctness on the timed path: the artifact's firing counts equal those of the capture + encode
reference, token for token.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_features.py
    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_features.py --sae runs/demo/sae --sentences 20000
    python benchmarks/bench_features.py --device cuda --sentences 20000 --d-sae 16384 --k 32   # wall time, synced
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from itertools import islice
from pathlib import Path

import torch
from _common import interleaved, machine_info, print_json, print_machine, print_table, sync, usable_device

from llama_sae import tinyworld
from llama_sae.corpus import Corpus
from llama_sae.features import build_features, load_features
from llama_sae.llama import load_model, load_tokenizer
from llama_sae.sae import load
from llama_sae.sae.evaluate import token_batches
from llama_sae.sae.model import SAE, SAEConfig
from llama_sae.splice import spliced


def random_sae(model, tok, hook: str, d_sae: int, k: int) -> SAE:
    """A TopK SAE initialised from real activations (speed does not depend on training)."""
    texts = [r.text for r in tinyworld.sentences(64, seed=3)]
    rows = torch.cat([model.capture(t.to(model.device), [hook])[hook][m.to(model.device)]
                      for t, m in token_batches(tok, texts)]).float()
    sae = SAE(SAEConfig(d_in=model.args.dim, d_sae=d_sae, k=k, normalize_activations="layer_norm", hook_name=hook))
    sae.init_(rows.cpu(), generator=torch.Generator().manual_seed(0))
    return sae.to(model.device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sae", help="SAE directory; default: a random SAE on the shipped tinyworld model")
    ap.add_argument("--hook", default="resid_post.2")
    ap.add_argument("--d-sae", type=int, default=2048)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--sentences", type=int, default=4000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    args = ap.parse_args()
    usable_device(args.device)
    torch.set_num_threads(args.threads)
    info = machine_info(args.threads, "model bf16 (shipped), SAE fp32")
    print_machine(info)

    if args.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(args.device)
    model = load_model(tinyworld.model_path(), device=args.device)
    tok = load_tokenizer(tinyworld.model_path())
    sae = load(args.sae, device=args.device) if args.sae else random_sae(model, tok, args.hook, args.d_sae, args.k)
    texts = [s.text for s in islice(Corpus(f"tinyworld:{args.sentences}:heldout"), args.sentences)]
    root = Path(tempfile.mkdtemp())
    (root / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    source = f"jsonl:{root / 'corpus.jsonl'}"  # read from disk, as a real corpus is (not generated on the fly)
    batches = [(t.to(args.device), m.to(args.device)) for t, m in token_batches(tok, texts, batch_size=args.batch)]
    n_tokens = sum(int(m.sum()) - len(m) for _, m in batches)  # sentence tokens, BOS excluded
    hook = sae.cfg.hook_name
    runs: list[tuple[float, float]] = []  # (pass 1, end to end) seconds of each features run

    def features():
        out = root / "f"
        shutil.rmtree(out, ignore_errors=True)
        t0, marks = time.perf_counter(), []
        build_features(model, tok, sae, source, out, sentences=args.sentences, batch_size=args.batch,
                       progress=lambda d, n: d == n and marks.append(time.perf_counter() - t0))
        runs.append((marks[-1], time.perf_counter() - t0))
        return load_features(out)

    @torch.no_grad()
    def spliced_forward():
        with spliced(model, sae):
            for tokens, _ in batches:
                model(tokens)
        sync(args.device)

    @torch.no_grad()
    def capture_encode():
        fires = torch.zeros(sae.cfg.d_sae, dtype=torch.int64, device=args.device)
        for tokens, mask in batches:
            valid = mask.clone()
            valid[:, 0] = False
            vals, idx = sae.encode_topk(model.capture(tokens, [hook])[hook][valid])
            fires += torch.bincount(idx[vals > 0], minlength=sae.cfg.d_sae)
        return fires.cpu()

    med, _, last = interleaved({"features": features, "spliced forward": spliced_forward,
                                "capture + encode": capture_encode}, repeats=args.repeats)
    f = last["features"]
    ok = bool(torch.equal((f.frequency.double() * f.meta["tokens"]).round().long(), last["capture + encode"]))
    assert f.meta["tokens"] == n_tokens, (f.meta["tokens"], n_tokens)
    assert ok, "the artifact's firing counts differ from the capture + encode reference"
    p1 = statistics.median(p for p, _ in runs[1:])  # the warm-up run left out
    paths = [("features (end to end)", med["features"]), ("features pass 1", p1),
             ("spliced forward", med["spliced forward"]), ("capture + encode", med["capture + encode"])]
    base = med["spliced forward"]
    rows = [[name, f"{sec:.2f}", f"{n_tokens / sec:,.0f}", f"{base / sec:.2f}"] for name, sec in paths]
    print_table(["path", "seconds", "tokens/s", "speed vs spliced forward"], rows)
    print(f"{n_tokens:,} sentence tokens in {args.sentences:,} sentences; d_sae {sae.cfg.d_sae}, k {sae.cfg.k}, "
          f"{hook}; firing counts equal the reference: {ok}")
    shutil.rmtree(root, ignore_errors=True)
    print_json({"benchmark": "features", **info, "tokens": n_tokens, "sentences": args.sentences,
                "d_sae": sae.cfg.d_sae, "k": sae.cfg.k, "features_s": med["features"], "features_pass1_s": p1,
                "spliced_forward_s": med["spliced forward"], "capture_encode_s": med["capture + encode"],
                "features_tokens_per_s": n_tokens / med["features"],
                "ratio_features_vs_spliced": med["spliced forward"] / med["features"],
                "ratio_pass1_vs_spliced": med["spliced forward"] / p1, "counts_equal": ok})


if __name__ == "__main__":
    main()
