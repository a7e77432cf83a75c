"""Memory and CPU time of the features pass's token-pieces blob (pass 2's sentences, as UTF-8 pieces per token).

At the seed's width the artifact stores millions of example sentences. Pass 2 used to keep each sentence's pieces
as Python strings and encode every token's piece for the blob (one bytes object per token); it now keeps the
token ids (int32) and gathers the bytes from a table of the distinct ids (:func:`llama_sae.features.piece_blob_of`).
Each variant runs in its own process (peak RSS is per process) on the same synthetic ids, ``--sentences`` x
``--tokens`` over the tinyworld vocabulary, and both must give the same blob:

* ids+table    the shipped path: int32 ids per sentence, one decode per distinct id, a numpy gather
* str-pieces   the previous path, kept here as the baseline: a list of piece strings per sentence, then
               ``s.encode()`` per token and one join

    python benchmarks/bench_features_pieces.py
    python benchmarks/bench_features_pieces.py --sentences 1000000
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import subprocess
import sys
import time

import numpy as np
from _common import machine_info, print_json, print_machine, print_table


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sentences", type=int, default=500_000)
    p.add_argument("--tokens", type=int, default=20, help="tokens per sentence")
    p.add_argument("--variant", choices=["ids+table", "str-pieces"], help=argparse.SUPPRESS)  # one child run
    return p.parse_args(argv)


def child(a: argparse.Namespace) -> dict:
    """One variant in this process: peak RSS above the start, CPU seconds, and a hash of the blob."""
    from llama_sae import tinyworld
    from llama_sae.features import piece_blob_of
    from llama_sae.llama import load_tokenizer

    tok = load_tokenizer(tinyworld.model_path())
    ids = np.random.default_rng(0).integers(3, 4000, size=(a.sentences, a.tokens)).astype(np.int32)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.process_time()
    if a.variant == "ids+table":
        per_sentence = [row.copy() for row in ids]  # what pass 2 keeps
        blob = bytes(piece_blob_of(tok, np.concatenate(per_sentence))[0].numpy())
    else:
        cache: dict[int, str] = {}
        per_sentence = [[cache.setdefault(t, tok.decode([t])) for t in row] for row in ids.tolist()]
        blob = b"".join(p.encode("utf-8") for ps in per_sentence for p in ps)
    seconds = time.process_time() - t0
    peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024  # KiB -> MiB
    return {"peak_mib": round(peak), "cpu_s": round(seconds, 2), "blob_sha256": hashlib.sha256(blob).hexdigest()}


def main(argv=None) -> dict:
    a = parse_args(argv)
    if a.variant:
        print(json.dumps(child(a)))
        return {}
    runs = {}
    for variant in ("ids+table", "str-pieces"):
        cmd = [sys.executable, __file__, "--variant", variant, "--sentences", str(a.sentences), "--tokens",
               str(a.tokens)]
        runs[variant] = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    assert runs["ids+table"]["blob_sha256"] == runs["str-pieces"]["blob_sha256"], "the blobs must be identical"
    info = machine_info(1)
    print_machine(info)
    new, old = runs["ids+table"], runs["str-pieces"]
    print_table(["variant", "peak MiB", "CPU s"], [[n, r["peak_mib"], r["cpu_s"]] for n, r in runs.items()])
    result = {"machine": info, "sentences": a.sentences, "tokens_per_sentence": a.tokens, "runs": runs,
              "memory_ratio_old_over_new": round(old["peak_mib"] / max(new["peak_mib"], 1), 2),
              "time_ratio_old_over_new": round(old["cpu_s"] / max(new["cpu_s"], 1e-9), 2)}
    print_json(result)
    return result


if __name__ == "__main__":
    main()
