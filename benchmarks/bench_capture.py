"""Capture throughput against a bare forward of the same model to the same layer, on the same inputs.

What is measured, in one process (each number a median over ``--repeats`` rounds, paths interleaved so
that load from other processes hits them alike):

* capture: ``llama_sae.capture.capture`` end to end on ``--tokens`` tokens of the tinyworld corpus into a
  fresh store: the corpus read and tokenized in a background thread, packing (and its mask) there too,
  forward, gather, float64 statistics, bf16 shards serialized, hashed and written by the background
  writer. Its loop time counts (model loading and store set-up are reported apart, as "fixed").
* bare forward: ``model.capture(tokens, hooks, positions=..., mask=...)`` over exactly the packed inputs
  the capture fed (same rows, same forward split, masks prebuilt), nothing else.
  Overhead = capture / bare - 1, two ways: across paired rounds, and inside each capture run (its loop
  time over the time its own ``model.capture`` calls took), which is immune to load changing between runs.
* full forward: ``model(tokens, ...)`` to the logits on the same inputs: what early exit saves.
* padded forward: the same sentences one per row, padded to the longest of each forward, plain causal
  attention (the batching that packing replaces). Bare, full and padded passes are interleaved.
* components (µs per token, run alone): reading the corpus, tokenizing, packing, float64 statistics, and
  serializing + hashing + writing a shard: where the overhead comes from when the model is tiny.

Correctness on the timed path: the store holds the first ``--tokens`` tokens (rows, no BOS), its checksums
verify, and its first batch equals the bare forward's activations (within bf16 rounding). Disk bytes per
stored token are compared with the 2·d bytes of bf16 activations alone.

The default model is a random one of the shipped tinyworld shape (6 layers, d_model 256, 8/4 heads, vocab
4,096) with a BPE tokenizer trained here: speed does not depend on the weights.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_capture.py --dtype bf16
    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_capture.py --dim 1024 --layers 8 --heads 16 --hook resid_post.3 \
        --tokens 30000 --overhead-only
    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_capture.py --model PATH --hook resid_post.14 --tokens 1000000
    python benchmarks/bench_capture.py --device cuda --dim 3072 --layers 24 --heads 24 --kv-heads 8 \
        --hook resid_post.23 --tokens 200000 --batch-tokens 32768 --overhead-only   # on a GPU

On a GPU (``--device cuda``) the baselines' inputs are already on the GPU (the capture copies each batch there
itself) and every timed pass ends with a synchronize.

OMP_WAIT_POLICY=PASSIVE: with OpenMP's default active waiting, a process on an oversubscribed machine runs a
small model's forward up to 9x slower than with passive waiting, unless some other thread of the process has
used torch (then libgomp throttles its spinning), which the capture's background threads do. Without it the
capture looks several times *faster* than its own bare forward.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _common import DTYPES, machine_info, print_json, print_machine, print_table, sync, usable_device

from llama_sae.capture import CaptureConfig, capture, forward_packed, pack, plan_batches, truncate
from llama_sae.corpus import Corpus
from llama_sae.llama import load_model, load_tokenizer
from llama_sae.llama.model import Transformer
from llama_sae.store import ActivationStore, ActStats, read_manifest, verify_store


def build_tiny(root: Path, dtype: torch.dtype, **shape) -> Path:
    """A random model of the tinyworld shape (or ``shape``: dim, n_layers, n_heads, n_kv_heads) with a
    4,096-token BPE trained on tinyworld text."""
    from llama_sae import tinyworld
    from llama_sae.llama.checkpoint import save_hf
    from llama_sae.tinyworld.train import TinyTrainConfig

    tinyworld.train_bpe_tokenizer([r.text for r in tinyworld.sentences(20_000, seed=0)], root / "tok",
                                  vocab_size=4096)
    torch.manual_seed(0)
    model = Transformer(TinyTrainConfig(**shape).model_args()).to(dtype)
    return save_hf(model, root / "model", tokenizer_dir=root / "tok")


def capture_batches(model_dir: Path, corpus: str, store_dir: Path, tokens: int, device: str = "cpu") -> list[dict]:
    """The capture's batches again: per batch its sentences, Packed, forward inputs and padded inputs (the
    forward inputs on ``device``)."""
    manifest = read_manifest(store_dir)
    c = manifest["capture"]
    plan = plan_batches(Corpus(corpus), load_tokenizer(model_dir), c["sentences_per_batch"], c["context"],
                        manifest["corpus"]["max_tokens"], 0, 1, 0, c["pad_id"])
    out, fed = [], 0
    for batch in plan:
        sentences, packed = batch.sentences, batch.packed
        if fed + batch.fed > tokens:
            sentences = truncate(batch.sentences, tokens - fed)
            packed = pack(sentences, c["context"], c["pad_id"])
        fed += min(batch.fed, tokens - fed)
        R, T = packed.tokens.shape
        per = math.ceil(R / math.ceil(R * T / c["batch_tokens"]))  # forward_packed's split
        inputs = [(packed.tokens[lo:lo + per].to(device), packed.positions[lo:lo + per].to(device),
                   None if packed.mask is None else packed.mask[lo:lo + per].to(device)) for lo in range(0, R, per)]
        out.append({"sentences": sentences, "packed": packed, "inputs": inputs,
                    "padded": [t.to(device) for t in padded(sentences, c["batch_tokens"], c["pad_id"])]})
        if fed >= tokens:
            return out
    raise SystemExit(f"corpus {corpus} has fewer than {tokens} tokens")


def padded(sentences, batch_tokens: int, pad_id: int) -> list[torch.Tensor]:
    """One sentence per row, padded to the longest of each forward of about ``batch_tokens`` cells."""
    ids = [t for _, t in sentences]
    per = max(1, batch_tokens // max(map(len, ids)))
    out = []
    for lo in range(0, len(ids), per):
        group = ids[lo:lo + per]
        w = max(map(len, group))
        out.append(torch.tensor([t + [pad_id] * (w - len(t)) for t in group]))  # [rows, w]
    return out


def forwards(model, hooks: list[str], batches: list[dict], rounds: int, names: tuple[str, ...] | None = None
             ) -> dict[str, list[float]]:
    """Seconds per pass over all batches for bare / full / padded forwards; whole passes are interleaved with
    the order rotated every round (interleaving batch by batch would let the full forward's large logits
    churn the allocator under the next path)."""
    paths = {
        "bare forward": lambda b: [model.capture(t, hooks, positions=p, mask=m) for t, p, m in b["inputs"]],
        "full forward": lambda b: [model(t, positions=p, mask=m) for t, p, m in b["inputs"]],
        "padded forward": lambda b: [model.capture(t, hooks) for t in b["padded"]],
    }
    names = list(names or paths)
    times = {k: [] for k in names}
    with torch.inference_mode():
        for r in range(rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                paths[name](batches[0])  # settle the allocator on this path's shapes
                sync(model.device)
                t0 = time.perf_counter()
                for b in batches:
                    paths[name](b)
                sync(model.device)
                times[name].append(time.perf_counter() - t0)
    return times


def components(model_dir: Path, corpus: str, store_dir: Path, batches: list[dict], hooks: list[str]
               ) -> dict[str, float]:
    """Seconds of each piece of capture work, run alone, for the whole token budget."""
    from safetensors.torch import save

    n_sent = batches[-1]["sentences"][-1][0] + 1
    t0 = time.perf_counter()
    texts = [s.text for _, s in zip(range(n_sent), Corpus(corpus))]
    t_read = time.perf_counter() - t0
    tok = load_tokenizer(model_dir)
    t0 = time.perf_counter()
    for text in texts:
        tok.encode(text, bos=True)
    t_tok = time.perf_counter() - t0
    c = read_manifest(store_dir)["capture"]
    t0 = time.perf_counter()
    for b in batches:
        pack(b["sentences"], c["context"], c["pad_id"])
    t_pack = time.perf_counter() - t0
    store = ActivationStore(store_dir)
    shards = [store.read(i, hooks[0])["acts"].clone() for i in range(len(store.shards))]
    t0 = time.perf_counter()
    for x in shards:
        for _ in hooks:
            ActStats.of(x)
    t_stats = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i, x in enumerate(shards):
        data = save({f"acts.{h}": x for h in hooks})
        hashlib.sha256(data).hexdigest()
        (store_dir / f"bench-{i}.bin").write_bytes(data)
    t_write = time.perf_counter() - t0
    return {"read corpus": t_read, "tokenize": t_tok, "pack + mask": t_pack, "float64 stats": t_stats,
            "serialize + sha256 + write": t_write}


def check(model, hooks: list[str], store_dir: Path, batches: list[dict], tokens: int) -> None:
    """The store holds the first ``tokens`` tokens, verifies, and its first rows equal a bare forward's."""
    store = ActivationStore(store_dir)
    assert store.manifest["tokens"] == tokens and len(store) == tokens, "row count"
    assert verify_store(store_dir).ok, "checksums"
    first = store.read(0, hooks[0])
    assert int(first["position"].min()) >= 1, "BOS stored"
    want = forward_packed(model, batches[0]["packed"], hooks, store.manifest["capture"]["batch_tokens"])[hooks[0]]
    n = min(want.shape[0], first["acts"].shape[0])
    torch.testing.assert_close(first["acts"][:n].float(), want[:n].to(store.dtype).float().cpu(), atol=0.05,
                               rtol=0.02)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="checkpoint directory; default: a random model of the tinyworld shape")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="model compute dtype")
    p.add_argument("--dim", type=int, default=256, help="random model: d_model (tinyworld: 256)")
    p.add_argument("--layers", type=int, default=6, help="random model: blocks (tinyworld: 6)")
    p.add_argument("--heads", type=int, default=8, help="random model: query / key-value heads (tinyworld: 8/4)")
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--hook", action="append", help="hook point(s); default resid_post.2")
    p.add_argument("--corpus", default="tinyworld:100000")
    p.add_argument("--tokens", type=int, default=100_000)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--batch-tokens", type=int, default=8192)
    p.add_argument("--shard-rows", type=int, default=8192,
                   help="small shards spread the writer's work over the run, as in a long capture")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--overhead-only", action="store_true",
                   help="only capture against the bare forward (skip full/padded passes and components)")
    args = p.parse_args(argv)
    usable_device(args.device)

    torch.set_num_threads(args.threads)
    if os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE":
        print("warning: OMP_WAIT_POLICY=PASSIVE is not set: on a machine shared with other processes, OpenMP's "
              "spinning workers make some paths up to 10x slower than others (see BENCHMARKS.md)")
    hooks = args.hook or ["resid_post.2"]
    info = machine_info(args.threads, args.dtype)
    info["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY")
    info["device"] = args.device
    if args.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(args.device)
    print_machine(info)
    in_forward = [0.0]  # time inside Transformer.capture, summed (instrumentation for the in-run overhead)
    original = Transformer.capture

    def timed_capture(self, *a, **kw):
        sync(args.device)
        t0 = time.perf_counter()
        out = original(self, *a, **kw)
        sync(args.device)
        in_forward[0] += time.perf_counter() - t0
        return out

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shape = dict(dim=args.dim, n_layers=args.layers, n_heads=args.heads, n_kv_heads=args.kv_heads)
        model_dir = Path(args.model) if args.model else build_tiny(tmp, DTYPES[args.dtype], **shape)
        cfg = dict(model=str(model_dir), corpus=args.corpus, hooks=hooks, tokens=args.tokens, context=args.context,
                   batch_tokens=args.batch_tokens, shard_rows=args.shard_rows, dtype=args.dtype, progress=False,
                   device=args.device)
        store_dir = tmp / "store"
        summary = capture(CaptureConfig(out=str(store_dir), **cfg))  # warm-up, and the baselines' inputs
        model = load_model(model_dir, dtype=args.dtype, device=args.device)
        batches = capture_batches(model_dir, args.corpus, store_dir, args.tokens, args.device)
        check(model, hooks, store_dir, batches, args.tokens)

        cap, inside, fixed, bare = [], [], [], []
        Transformer.capture = timed_capture
        try:
            for r in range(args.repeats):
                for name in (["capture", "bare"] if r % 2 == 0 else ["bare", "capture"]):
                    if name == "bare":
                        bare.append(forwards(model, hooks, batches, 1, ("bare forward",))["bare forward"][0])
                        continue
                    shutil.rmtree(store_dir)
                    in_forward[0] = 0.0
                    t0 = time.perf_counter()
                    summary = capture(CaptureConfig(out=str(store_dir), **cfg))
                    cap.append(summary.loop_seconds)
                    inside.append(summary.loop_seconds / in_forward[0] - 1)
                    fixed.append(time.perf_counter() - t0 - summary.loop_seconds)
        finally:
            Transformer.capture = original
        names = ("bare forward",) if args.overhead_only else None
        times = forwards(model, hooks, batches, 1 if args.overhead_only else args.repeats, names)
        parts = {} if args.overhead_only else components(model_dir, args.corpus, store_dir, batches, hooks)

    med = {k: statistics.median(v) for k, v in times.items()}
    d, layers = model.args.dim, max(int(h.split(".")[1]) for h in hooks) + 1
    cells = sum(t.numel() for b in batches for t, _, _ in b["inputs"])
    pad_cells = sum(t.numel() for b in batches for t in b["padded"])
    real = sum(len(t) for b in batches for _, t in b["sentences"])  # tokens fed, BOS included
    result = {
        "tokens": args.tokens, "hooks": hooks, "d": d, "context": args.context, "batch_tokens": args.batch_tokens,
        "capture_tokens_per_s": args.tokens / statistics.median(cap),
        "bare_tokens_per_s": args.tokens / statistics.median(bare),
        "capture_overhead_medians": statistics.median(cap) / statistics.median(bare) - 1,
        "capture_overhead_paired": statistics.median(c / b for c, b in zip(cap, bare)) - 1,
        "capture_overhead_in_run": statistics.median(inside),
        "fixed_seconds": statistics.median(fixed),
        "layers_run": f"{layers}/{model.args.n_layers}", "packed_fill": real / cells, "padded_fill": real / pad_cells,
        "component_us_per_token": {k: 1e6 * v / args.tokens for k, v in parts.items()},
        "forward_us_per_token": 1e6 * med["bare forward"] / args.tokens,
        "bytes_per_token": summary.bytes / summary.rows, "bf16_bytes_per_token": 2 * d * len(hooks),
        "machine": info,
    }
    if not args.overhead_only:
        result["early_exit_speedup"] = med["full forward"] / med["bare forward"]
        result["packing_speedup_vs_padding"] = med["padded forward"] / med["bare forward"]
    print_table(["path", "median s", "tokens/s", "time / bare"],
                [["capture (loop)", f"{statistics.median(cap):.3f}", f"{result['capture_tokens_per_s']:,.0f}",
                  f"{statistics.median(cap) / statistics.median(bare):.3f}"],
                 ["bare forward (paired rounds)", f"{statistics.median(bare):.3f}",
                  f"{result['bare_tokens_per_s']:,.0f}", "1.000"]]
                + [[k + " (rotated passes)", f"{v:.3f}", f"{args.tokens / v:,.0f}", f"{v / med['bare forward']:.3f}"]
                   for k, v in med.items()])
    print(f"capture overhead over the bare forward: {100 * result['capture_overhead_medians']:+.1f}% (medians), "
          f"{100 * result['capture_overhead_paired']:+.1f}% (paired rounds), "
          f"{100 * result['capture_overhead_in_run']:+.1f}% (in-run: loop / its own forward calls); "
          f"fixed set-up {result['fixed_seconds']:.1f} s")
    if not args.overhead_only:
        print(f"early exit ({result['layers_run']} layers, no LM head): {result['early_exit_speedup']:.2f}x the full "
              f"forward's speed; packing: {result['packing_speedup_vs_padding']:.2f}x padding's (cells holding a "
              f"real token: packed {result['packed_fill']:.1%}, padded {result['padded_fill']:.1%})")
    print_table(["component (run alone)", "µs/token", "share of bare forward"],
                [[k, f"{v:.2f}", f"{v / result['forward_us_per_token']:.1%}"]
                 for k, v in result["component_us_per_token"].items()]
                + [["bare forward", f"{result['forward_us_per_token']:.2f}", "100%"]])
    print(f"disk: {result['bytes_per_token']:.1f} bytes per stored token; bf16 activations alone: "
          f"{result['bf16_bytes_per_token']} (2·d·hooks)")
    print_json(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
