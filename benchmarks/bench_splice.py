"""Cost of running the tiny model with an SAE spliced in, against the plain forward, and evaluation throughput.

At the demo SAE's size (d_in 256, 1,024 latents, k 32, at resid_post.3 of the shipped tinyworld model, in the
checkpoint's dtype, bf16): median seconds of one forward over a [B, T] batch of tinyworld text, interleaved with the
plain forward (same process, same batch), for each splice mode:

* exact        error term, no edit: adds exactly zero (the logits are checked equal to the plain forward's)
* recon-only   error_term=False: the model runs on x̂ (the "CE spliced" path of evaluation)
* recon-bf16   the same with compute_dtype=bfloat16: the encoder GEMM in bf16, values recomputed exactly
* edit         error term plus an edit that adds 2.0 to one latent (the steering path)
* edit-bf16    the same with compute_dtype=bfloat16
* edit-dense   error term plus an edit that rescales every latent (the worst case for the decoder)
* wrapper      SplicedModel(model, sae) with an edit, through its __call__ (should cost what "edit" costs)
* steer-last   a :class:`llama_sae.steer.Steering` with one ``add`` and one ``clamp`` steer on the ``last``
               position (prompt_len = T: one token per row is steered), through Steering.apply
* steer-add    one ``add`` steer on every position (``all``): the steering path that needs no encode

and the evaluation throughput in tokens/s: ``activation_metrics`` (FVU, L0, dead, ... over activations), as a
ratio to one reconstruction pass over the same activations, and ``model_metrics`` (CE clean / spliced /
zero-ablated and KL), as a ratio to three whole forwards per batch (see :func:`evaluation_costs`).

The SAE: ``--sae DIR`` (e.g. runs/demo/sae/...), else a random one at that size initialized on real activations
(its cost does not depend on training).

    python benchmarks/bench_splice.py                    # B=8, T=128, 1 thread, CPU time of this process
    python benchmarks/bench_splice.py --sae runs/demo/sae --repeats 30
    python benchmarks/bench_splice.py --shape seed --batch 1 --seq 256 --repeats 5   # the seed's shape, ~10 GB
    python benchmarks/bench_splice.py --device cuda --batch 64      # on a GPU: wall time, synchronized per call
    python benchmarks/bench_splice.py --device cuda --shape seed --batch 8 --seq 1024
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch
from _common import interleaved, machine_info, print_json, print_machine, print_table, synchronized, usable_device


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sae", default=None, help="SAE directory (default: a random SAE of the demo's size)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                   help="cpu: this process's CPU time (steady on a shared machine; use with --threads 1); on a GPU "
                        "always wall time, with the device synchronized at the end of every timed call")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--eval-texts", type=int, default=128)
    p.add_argument("--gen-tokens", type=int, default=48,
                   help="also time greedy generation with the KV cache: this many new tokens after a 16-token "
                        "prompt, batch 1 (the UI's and steering's path); 0 skips it")
    p.add_argument("--shape", choices=["demo", "seed"], default="demo",
                   help="seed: a random-weight bf16 model of Llama 3.2-3B's shape with the seed's SAE (65,536 "
                        "latents, k 64, at attn_in.23) on [batch, seq] random tokens; ~10 GB of RAM, no evaluation")
    return p.parse_args(argv)


def seed_shaped(seq: int, batch: int, device: str = "cpu"):
    """(model, tokens, sae) on ``device``: Llama 3.2-3B's shape in bf16 with random weights, and an SAE of the
    seed's shape (the costs do not depend on the weights)."""
    from llama_sae.llama.model import ModelArgs, Transformer, rope_inv_freq
    from llama_sae.sae import SAE, SAEConfig

    args = ModelArgs(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, vocab_size=128256, ffn_dim_multiplier=1.0,
                     multiple_of=256, tie_embeddings=True)
    g = torch.Generator(device).manual_seed(0)
    with torch.device("meta"):
        model = Transformer(args)
    model = model.to_empty(device=device).to(torch.bfloat16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0, 0.02, generator=g)
    model.inv_freq = rope_inv_freq(args).to(device)
    sae = SAE(SAEConfig(d_in=args.dim, d_sae=65536, k=64, hook_name="attn_in.23")).to(device)
    with torch.no_grad():
        sae.W_enc.normal_(0, args.dim ** -0.5, generator=g)
        sae.W_dec.copy_(sae.W_enc)
        sae.normalize_decoder_()
    tokens = torch.randint(0, args.vocab_size, (batch, seq), generator=g, device=device)
    return model, tokens, sae.eval()


def demo_sized_sae(model, tokens, hook: str):
    from llama_sae.sae import SAE, SAEConfig
    from llama_sae.sae.model import normalize

    sae = SAE(SAEConfig(d_in=model.args.dim, d_sae=1024, k=32, hook_name=hook))
    x = model.capture(tokens, [hook])[hook].flatten(0, 1).cpu()
    sae.init_(normalize(x, "layer_norm")[0], generator=torch.Generator().manual_seed(0))
    return sae.eval().to(model.device)


def steering(sae, specs: list[str]):
    """A :class:`llama_sae.steer.Steering` of ``specs`` on ``sae``, with unit 1 for every latent."""
    from llama_sae.steer import Steering, parse_steers

    hook = sae.cfg.hook_name
    return Steering({hook: sae}, parse_steers(specs), {hook: torch.ones(sae.cfg.d_sae, device=sae.W_dec.device)})


def steer_specs(sae, latent: int, positions: str) -> list[str]:
    """One add and one clamp steer on ``positions`` (the clamp on the next latent)."""
    return [f"{latent}:add:2:{positions}", f"{(latent + 1) % sae.cfg.d_sae}:clamp:3:{positions}"]


def generation_costs(model, prompt: list[int], sae, edit, latent: int, new_tokens: int, repeats: int, clock) -> dict:
    """Median ms per generated token (prefill included, amortized) of greedy cached generation, plain, spliced
    and steered (:class:`llama_sae.steer.Steering`: add + clamp on the ``last`` prompt token, and on every
    ``generated`` position)."""
    from llama_sae.llama.generate import generate_tokens
    from llama_sae.splice import spliced

    def run(positions=None, **kw):
        steer = None if positions is None else steering(sae, steer_specs(sae, latent, positions))

        def go():
            ctx = steer.apply(model, prompt_len=len(prompt)) if steer else spliced(model, sae, **kw) if kw \
                else contextlib.nullcontext()
            with torch.inference_mode(), ctx:
                return [int(t[0]) for t, _ in generate_tokens(model, [prompt], max_new_tokens=new_tokens,
                                                              stop_ids=set())]
        return go

    fns = {"plain": run(), "exact": run(error_term=True), "recon-only": run(error_term=False),
           "recon-bf16": run(error_term=False, compute_dtype=torch.bfloat16), "edit (steering)": run(edit=edit),
           "steer last": run("last"), "steer generated": run("generated")}
    if model.device.type == "cuda":
        fns = {n: synchronized(f, model.device) for n, f in fns.items()}
    med, _, last = interleaved(fns, repeats, clock=clock)
    assert last["exact"] == last["plain"]
    return {n: round(t * 1e3 / new_tokens, 3) for n, t in med.items()}


def main(argv=None) -> dict:
    a = parse_args(argv)
    usable_device(a.device)
    torch.set_num_threads(a.threads)
    from llama_sae import tinyworld
    from llama_sae.demo import DEMO_HOOK
    from llama_sae.llama import load_model, load_tokenizer
    from llama_sae.sae import load
    from llama_sae.splice import SplicedModel, spliced

    gpu = a.device.startswith("cuda")
    if a.shape == "seed":
        model, tokens, sae = seed_shaped(a.seq, a.batch, a.device)
    else:
        model, tok = load_model(tinyworld.model_path(), device=a.device), load_tokenizer(tinyworld.model_path())
        n_sentences = max(400, a.batch * a.seq // 10)  # tinyworld sentences average ~15 tokens
        stream = [t for r in tinyworld.sentences(n_sentences, split="heldout") for t in tok.encode(r.text, bos=True)]
        tokens = torch.tensor(stream[: a.batch * a.seq], device=a.device).view(a.batch, a.seq)
        sae = load(a.sae, device=a.device) if a.sae else demo_sized_sae(model, tokens, DEMO_HOOK)
    acts = model.capture(tokens, [sae.cfg.hook_name])[sae.cfg.hook_name].flatten(0, 1)  # [B·T, d_in]
    latent = int(sae.encode(acts).sum(0).argmax())  # the most active latent: the one the edit boosts

    def add_one(h):
        return h.index_add(-1, torch.tensor([latent], device=h.device), torch.full((*h.shape[:-1], 1), 2.0,
                                                                                   device=h.device))

    def plain():
        with torch.inference_mode():
            return model(tokens)

    def mode(**kw):
        def run():
            with torch.inference_mode(), spliced(model, sae, **kw):
                return model(tokens)
        return run

    wrapper = SplicedModel(model, sae, edit=add_one)
    steer_last = steering(sae, steer_specs(sae, latent, "last"))
    steer_add = steering(sae, [f"{latent}:add:2"])

    def steered(s):
        def run():
            with torch.inference_mode(), s.apply(model, prompt_len=a.seq):
                return model(tokens)
        return run

    def wrapped():
        with torch.inference_mode():
            return wrapper(tokens)

    bf16 = torch.bfloat16
    fns = {"plain": plain, "exact": mode(), "recon-only": mode(error_term=False),
           "recon-bf16": mode(error_term=False, compute_dtype=bf16), "edit": mode(edit=add_one),
           "edit-bf16": mode(edit=add_one, compute_dtype=bf16), "edit-dense": mode(edit=lambda h: h * 1.5),
           "wrapper": wrapped, "steer-last": steered(steer_last), "steer-add": steered(steer_add)}
    if a.shape == "seed":  # the dense-edit rows would add [N, 65,536] tensors; the wrapper is "edit" again
        fns = {n: f for n, f in fns.items() if n not in ("edit-dense", "wrapper")}
    info = machine_info(a.threads, str(model.dtype).removeprefix("torch."))
    if gpu:
        info["gpu"] = torch.cuda.get_device_name(a.device)
        a.clock = "wall"
        fns = {n: synchronized(f, a.device) for n, f in fns.items()}
    clock = time.process_time if a.clock == "cpu" else time.perf_counter
    med, _, last = interleaved(fns, a.repeats, clock=clock)
    assert torch.equal(last["exact"], last["plain"]), "the exact splice must reproduce the logits bit for bit"
    assert not torch.equal(last["recon-only"], last["plain"]) and not torch.equal(last["edit"], last["plain"])
    assert a.shape == "seed" or torch.equal(last["wrapper"], last["edit"])
    steered_rows = (last["steer-last"] != last["plain"]).flatten(2).any(-1).any(0)  # [T] positions that moved
    assert steered_rows[-1] and not steered_rows[:-1].any(), "steer-last must change the last position only"
    n_tok = a.batch * a.seq
    rows = [[name, f"{med[name] * 1e3:.1f}", f"{n_tok / med[name]:,.0f}", f"{med[name] / med['plain']:.3f}"]
            for name in fns]
    result = {"machine": info, "device": a.device, "clock": a.clock, "batch": a.batch, "seq": a.seq, "shape": a.shape,
              "sae": a.sae or f"random, {a.shape} size", "d_in": sae.cfg.d_in, "d_sae": sae.cfg.d_sae, "k": sae.cfg.k,
              "hook": sae.cfg.hook_name, "median_ms": {n: round(t * 1e3, 2) for n, t in med.items()},
              "ratio_vs_plain": {n: round(t / med["plain"], 3) for n, t in med.items()}}
    print_machine(info)
    print(f"[{a.batch}, {a.seq}] tokens ({'random' if a.shape == 'seed' else 'tinyworld text'}); SAE "
          f"{result['sae']}: d_in {sae.cfg.d_in}, {sae.cfg.d_sae} latents, k {sae.cfg.k}, at {sae.cfg.hook_name}")
    print(f"clock: {a.clock} time{', synchronized' if gpu else ''}, {a.threads} thread(s), {a.device}; median of "
          f"{a.repeats} interleaved rounds")
    print_table(["mode", "ms / forward", "tokens/s", "x plain"], rows)
    if a.gen_tokens and a.shape == "demo":
        result["generation"] = generation_costs(model, tokens[0, :16].tolist(), sae, add_one, latent, a.gen_tokens,
                                                a.repeats, clock)
        gen = result["generation"]
        print(f"greedy generation, batch 1, 16-token prompt + {a.gen_tokens} new tokens, KV cache:")
        print_table(["mode", "ms / new token", "x plain"],
                    [[n, f"{t:.2f}", f"{t / gen['plain']:.3f}"] for n, t in gen.items()])
    if a.shape == "seed":
        print_json(result)
        return result

    result.update(evaluation_costs(model, tok, sae, acts, a.eval_texts, max(3, a.repeats // 3), clock))
    ev = result["evaluation"]
    print("evaluation (medians, interleaved with their references):")
    print_table(["pass", "tokens/s", "x reference", "reference"],
                [["activation_metrics", f"{ev['activation_metrics_tokens_per_s']:,}",
                  f"{ev['activation_metrics_vs_reconstruction']:.3f}", "one reconstruction pass (sae(x))"],
                 ["model_metrics", f"{ev['model_metrics_tokens_per_s']:,}",
                  f"{ev['model_metrics_vs_three_forwards']:.3f}", "three whole forwards (clean, spliced, zero)"]])
    print_json(result)
    return result


def evaluation_costs(model, tok, sae, acts, n_texts: int, repeats: int, clock) -> dict:
    """Evaluation throughput, each pass next to the least it could cost done naively, in the same rounds:
    ``activation_metrics`` against one reconstruction pass over the same activations, and ``model_metrics``
    (CE clean / spliced / zero-ablated and KL) against three whole forwards per batch (what it ran before
    its forwards shared the blocks before the hook's)."""
    from llama_sae import tinyworld
    from llama_sae.sae.evaluate import activation_metrics, model_metrics, token_batches
    from llama_sae.splice import spliced

    chunks = [acts[i:i + 512] for i in range(0, len(acts), 512)]
    texts = [r.text for r in tinyworld.sentences(n_texts, split="heldout")]
    batches = [(t.to(model.device), m.to(model.device)) for t, m in token_batches(tok, texts, batch_size=16)]
    hook = sae.cfg.hook_name

    def three_forwards():
        with torch.inference_mode():
            for tokens, _ in batches:
                model(tokens)
                with spliced(model, sae, error_term=False):
                    model(tokens)
                with model.hooked({hook: torch.zeros_like}):
                    model(tokens)

    def reconstruction():
        with torch.inference_mode():
            return [sae(c) for c in chunks]

    fns = {"activation_metrics": lambda: activation_metrics(sae, chunks), "reconstruction": reconstruction,
           "model_metrics": lambda: model_metrics(model, sae, batches), "three_forwards": three_forwards}
    if model.device.type == "cuda":
        fns = {n: synchronized(f, model.device) for n, f in fns.items()}
    med, _, last = interleaved(fns, repeats, clock=clock)
    predicted = last["model_metrics"]["predicted_tokens"]
    return {"evaluation": {
        "repeats": repeats, "texts": n_texts, "predicted_tokens": predicted,
        "activation_metrics_tokens_per_s": round(len(acts) / med["activation_metrics"]),
        "activation_metrics_vs_reconstruction": round(med["activation_metrics"] / med["reconstruction"], 3),
        "model_metrics_tokens_per_s": round(predicted / med["model_metrics"]),
        "model_metrics_vs_three_forwards": round(med["model_metrics"] / med["three_forwards"], 3)}}


if __name__ == "__main__":
    main()
