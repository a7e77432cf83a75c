"""Memory and time of loading a Llama checkpoint with ``llama_sae.llama.load_model``.

What is measured: the peak resident set size (RSS) that loading adds, as a multiple of the
checkpoint's size on disk (goal <= 1.2x), and the load time. Each measurement runs in a fresh
subprocess: the child imports torch and llama_sae, runs a forward of a tiny model of the same dtype
(so the library code pages and kernel state that any first forward brings in, ~100 MB, are in the
baseline; ``--cold`` skips this), reads its RSS (the baseline), loads, reads the peak RSS
(``resource.getrusage().ru_maxrss``), then runs a short forward, which touches every weight, and
reads the peak again. ratio = (peak RSS - baseline RSS) / file bytes. VmHWM, reset to the baseline
through /proc/self/clear_refs, is reported as an independent check. ru_maxrss survives fork + exec,
so the children are started through a small launcher process (else they would report this parent's
RSS as their peak).

Why: our loader memory-maps the weights and assigns the mapped tensors to a model built on the meta
device, so a checkpoint in the requested dtype should cost about its own size and no copy. Mapped
file pages count in RSS only once touched, so the peak right after loading can be far below the
file size; after the forward all of them have been touched. The child also reports the growth of
RssAnon (memory the process allocated) and RssFile (mapped file pages: page cache, shared and
reclaimable) by the end, which tells a copy from a mapping.

Variants: Hugging Face format (config.json + model.safetensors) in bf16 and fp32; bf16 again with a
tiny model built on the meta device before the baseline (the one-time cost of the first load in a
process excluded); fp32 loaded as bf16 (a conversion, so a copy is expected); Meta format
(params.json + consolidated.NN.pth, written with ``save_meta``) in 1 and 2 shards; and transformers'
``from_pretrained`` on the bf16 file for reference. The files are freshly written, so they are in
the page cache: load times are warm-cache times. Correctness: every child saves its forward's
logits; fp32 must match transformers' within 1e-4, and every bf16 variant must equal the bf16
Hugging Face load exactly.

    python benchmarks/bench_llama_load.py
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import DTYPES, build_hf_llama, machine_info, print_json, print_machine, print_table, quiet_transformers

MB = 1024 * 1024


# --------------------------------------------------------------------------- child
def _status() -> dict[str, int]:
    """VmRSS, VmHWM (peak), RssAnon, RssFile of this process in bytes (from /proc/self/status)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    return out


def _maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def child(args) -> None:
    """Load one checkpoint, run a forward, print one JSON line of measurements."""
    import torch

    from llama_sae.llama import ModelArgs, Transformer, load_model  # the baseline includes these imports

    if args.impl == "transformers":
        quiet_transformers()
        from transformers import LlamaForCausalLM

    torch.set_num_threads(args.threads)
    tokens = torch.randint(3, args.vocab, (1, args.fwd_tokens), generator=torch.Generator().manual_seed(0))
    if args.warm_dtype != "none":
        # A forward of a tiny model in the same dtype first, so that the library code pages and kernel
        # state a first forward brings in (~100 MB, independent of the checkpoint) are in the baseline.
        tiny = Transformer(ModelArgs(dim=128, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=512, hidden_dim=256))
        with torch.inference_mode():
            tiny.to(DTYPES[args.warm_dtype])(tokens % 512)
        del tiny
    if args.warm_meta:
        # Build a tiny model on the meta device, as load_model does, so that any one-time cost of the first
        # load in a process is in the baseline. (nn.Embedding's normal_ init on meta tensors once imported
        # torch._dynamo this way: +2 s and ~70 MB. With that fixed, this row should equal plain "hf bf16".)
        with torch.device("meta"):
            Transformer(ModelArgs(dim=128, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=512, hidden_dim=256))
    try:  # reset VmHWM to the current RSS (Linux >= 4.0), an independent check of ru_maxrss
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        hwm_reset = True
    except OSError:
        hwm_reset = False
    base_status = _status()
    base = base_status["VmRSS"]
    base_peak = _maxrss()
    dtype = None if args.load_dtype == "auto" else DTYPES[args.load_dtype]
    t0 = time.perf_counter()
    if args.impl == "ours":
        model = load_model(args.path, dtype=dtype)
    else:
        model = LlamaForCausalLM.from_pretrained(args.path, dtype=dtype or "auto").eval()
    load_s = time.perf_counter() - t0
    peak_load = _maxrss()
    after_load = _status()
    with torch.inference_mode():
        t0 = time.perf_counter()
        logits = model(tokens) if args.impl == "ours" else model(tokens, use_cache=False).logits
        fwd_s = time.perf_counter() - t0
    peak_fwd = _maxrss()
    after_fwd = _status()
    torch.save(logits.float(), args.logits_out)
    print(json.dumps({"base_rss": base, "base_status": base_status, "base_peak": base_peak, "hwm_reset": hwm_reset,
                      "load_s": load_s,
                      "forward_s": fwd_s, "peak_load": peak_load, "peak_forward": peak_fwd, "after_load": after_load,
                      "after_forward": after_fwd, "dtype": str(next(model.parameters()).dtype)}))


# --------------------------------------------------------------------------- parent
def dir_bytes(path: Path) -> int:
    """Bytes of the weight files (safetensors / pth) in a checkpoint directory."""
    return sum(f.stat().st_size for f in path.iterdir() if f.suffix in (".safetensors", ".pth"))


def write_checkpoints(root: Path, a) -> dict[str, Path]:
    """HF bf16 + fp32 (written by transformers) and Meta bf16 in 1 and 2 shards (written by us)."""
    import torch

    from llama_sae.llama import load_model
    from llama_sae.llama.checkpoint import save_meta

    model = build_hf_llama(hidden=a.hidden, layers=a.layers, heads=a.heads, kv_heads=a.kv_heads,
                           intermediate=a.intermediate, vocab=a.vocab, tied=not a.untied, init_range=0.05)
    dirs = {"hf-fp32": root / "hf-fp32", "hf-bf16": root / "hf-bf16",
            "meta-bf16-1shard": root / "meta-bf16-1", "meta-bf16-2shards": root / "meta-bf16-2"}
    model.save_pretrained(dirs["hf-fp32"])
    model.to(torch.bfloat16).save_pretrained(dirs["hf-bf16"])
    del model
    ours = load_model(dirs["hf-bf16"])
    save_meta(ours, dirs["meta-bf16-1shard"], shards=1)
    save_meta(ours, dirs["meta-bf16-2shards"], shards=2)
    return dirs


def reference_logits(path: Path, a):
    """transformers' fp32 logits for the child's forward tokens (the fp32 correctness reference)."""
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokens = torch.randint(3, a.vocab, (1, a.fwd_tokens), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        return model(tokens, use_cache=False).logits.float()


# ru_maxrss survives fork + exec: a child forked straight from this (large) process would report this
# process's RSS as its own peak. So children are started by a small launcher process in between.
_LAUNCHER = "import subprocess, sys; sys.exit(subprocess.run(sys.argv[1:]).returncode)"


def run_child(a, impl: str, path: Path, load_dtype: str, model_dtype: str, logits_out: Path,
              warm_meta: bool = False) -> dict:
    cmd = [sys.executable, "-c", _LAUNCHER, sys.executable, os.path.abspath(__file__), "--child",
           "--impl", impl, "--path", str(path),
           "--load-dtype", load_dtype, "--warm-dtype", "none" if a.cold else model_dtype,
           "--logits-out", str(logits_out), "--threads", str(a.threads),
           "--vocab", str(a.vocab), "--fwd-tokens", str(a.fwd_tokens)] + (["--warm-meta"] if warm_meta else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"child failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--untied", action="store_true", help="separate LM head (default: tied, as Llama 3.2 1B/3B)")
    p.add_argument("--fwd-tokens", type=int, default=8, help="tokens in the weight-touching forward")
    p.add_argument("--repeats", type=int, default=3, help="fresh subprocesses per variant (median reported)")
    p.add_argument("--cold", action="store_true",
                   help="no tiny warm-up forward before the baseline (the delta then includes ~100 MB of code "
                        "pages and kernel state that any first forward brings in)")
    p.add_argument("--no-transformers", action="store_true", help="skip the transformers reference row")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--impl", choices=["ours", "transformers"], default="ours", help=argparse.SUPPRESS)
    p.add_argument("--path", help=argparse.SUPPRESS)
    p.add_argument("--load-dtype", default="auto", help=argparse.SUPPRESS)
    p.add_argument("--warm-dtype", default="none", help=argparse.SUPPRESS)
    p.add_argument("--warm-meta", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--logits-out", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        child(a)
        return 0

    import torch

    torch.set_num_threads(a.threads)
    quiet_transformers()
    info = machine_info(a.threads)
    print_machine(info)
    variants = [  # (name, impl, checkpoint key, load dtype, model dtype)
        ("hf bf16", "ours", "hf-bf16", "auto", "bf16"),
        ("hf bf16, 2nd load in process", "ours", "hf-bf16", "auto", "bf16"),
        ("hf fp32", "ours", "hf-fp32", "auto", "fp32"),
        ("hf fp32 -> bf16", "ours", "hf-fp32", "bf16", "bf16"),
        ("meta bf16, 1 shard", "ours", "meta-bf16-1shard", "auto", "bf16"),
        ("meta bf16, 2 shards", "ours", "meta-bf16-2shards", "auto", "bf16"),
    ]
    if not a.no_transformers:
        variants.append(("transformers hf bf16", "transformers", "hf-bf16", "auto", "bf16"))

    result = {"benchmark": "llama_load", "machine": info, "config": {k: v for k, v in vars(a).items()
                                                                     if k not in ("child", "impl", "path",
                                                                                  "load_dtype", "logits_out",
                                                                                  "warm_dtype")}}
    rows, ok, out = [], True, []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        dirs = write_checkpoints(root, a)
        print(f"wrote checkpoints in {time.perf_counter() - t0:.1f}s: "
              + ", ".join(f"{k} {dir_bytes(v) / MB:.0f} MB" for k, v in dirs.items()))
        ref32 = reference_logits(dirs["hf-fp32"], a)
        logits = {}
        for name, impl, key, load_dtype, model_dtype in variants:
            runs = []
            for r in range(a.repeats):
                lp = root / f"logits-{len(out)}-{r}.pt"
                runs.append(run_child(a, impl, dirs[key], load_dtype, model_dtype, lp, warm_meta="2nd load" in name))
                logits[name] = torch.load(lp)
            size = dir_bytes(dirs[key])
            med = {k: statistics.median(run[k] for run in runs) for k in ("load_s", "forward_s")}
            d_load = statistics.median(run["peak_load"] - run["base_rss"] for run in runs)
            d_fwd = statistics.median(run["peak_forward"] - run["base_rss"] for run in runs)
            # cross-check: VmHWM (reset to the baseline RSS in the child) after the forward
            hwm_fwd = statistics.median(run["after_forward"]["VmHWM"] - run["base_status"]["VmHWM"] for run in runs)
            anon = statistics.median(run["after_forward"]["RssAnon"] - run["base_status"]["RssAnon"] for run in runs)
            rfile = statistics.median(run["after_forward"]["RssFile"] - run["base_status"]["RssFile"] for run in runs)
            entry = {"variant": name, "impl": impl, "checkpoint": key, "load_dtype": load_dtype,
                     "model_dtype": runs[0]["dtype"], "file_bytes": size, "load_s": med["load_s"],
                     "forward_s": med["forward_s"], "peak_delta_after_load": d_load,
                     "peak_delta_after_forward": d_fwd, "ratio_after_load": d_load / size,
                     "ratio_after_forward": d_fwd / size,
                     "vmhwm_delta_after_forward": hwm_fwd, "vmhwm_reset": runs[0]["hwm_reset"],
                     "rss_anon_delta_after_forward": anon,
                     "rss_file_delta_after_forward": rfile, "base_rss": runs[0]["base_rss"], "runs": runs}
            out.append(entry)
            rows.append([name, f"{size / MB:.0f}", f"{med['load_s']:.2f}", f"{d_load / MB:.0f}",
                         f"{d_load / size:.2f}", f"{d_fwd / MB:.0f}", f"{d_fwd / size:.2f}",
                         f"{hwm_fwd / size:.2f}",
                         f"{anon / MB:.0f}", f"{rfile / MB:.0f}"])

    # correctness on the timed path: the logits each child computed right after its measured load
    checks = {}
    fp32_diff = (logits["hf fp32"] - ref32).abs().max().item()
    checks["hf fp32 vs transformers fp32 (max abs)"] = (fp32_diff, fp32_diff <= 1e-4)
    for name in logits:
        if name not in ("hf fp32", "hf bf16"):
            same = bool(torch.equal(logits[name], logits["hf bf16"]))
            checks[f"{name} == hf bf16"] = ((logits[name] - logits["hf bf16"]).abs().max().item(), same)
    bf16_diff = (logits["hf bf16"] - ref32).abs().max().item()
    checks["hf bf16 vs transformers fp32 (max abs, info)"] = (bf16_diff, True)

    print()
    print_table(["variant", "file MB", "load s", "peak Δ load MB", "x file", "peak Δ fwd MB", "x file",
                 "x file (VmHWM)", "ΔRssAnon MB", "ΔRssFile MB"], rows)
    print("\nbaseline RSS after imports: " + ", ".join(f"{e['variant']} {e['base_rss'] / MB:.0f} MB" for e in out))
    print("\nchecks:")
    for name, (diff, good) in checks.items():
        ok &= good
        print(f"  {name}: {diff:.2e} {'ok' if good else 'FAIL'}")
    result["variants"] = out
    result["checks"] = {k: {"max_abs_diff": d, "ok": g} for k, (d, g) in checks.items()}
    result["ok"] = bool(ok)
    print()
    print_json(result)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
