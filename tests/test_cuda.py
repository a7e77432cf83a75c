"""The CUDA paths against the CPU ones: every stage on a GPU computes what it computes on the CPU.

Skipped where torch sees no CUDA GPU (CI, this project's 2-core machines). Run them on a GPU machine with
``python -m pytest tests/test_cuda.py`` (benchmarks/gpu_check.sh does, with the GPU benchmarks). Tolerances:
float32 on both sides agrees to rounding (different kernels, reduction orders: rel 1e-4 on logits and
activations); the TopK selection may differ only on near-ties, so indices are compared through their values.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

from llama_sae import tinyworld
from llama_sae.llama import generate, load_model, load_tokenizer
from llama_sae.sae import load
from llama_sae.splice import spliced

CUDA = os.environ.get("LLAMA_SAE_TEST_GPU", "cuda")  # "cpu" checks these tests' own logic on a machine without one
pytestmark = pytest.mark.skipif(CUDA.startswith("cuda") and not torch.cuda.is_available(), reason="needs a CUDA GPU")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64 on the CPU."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(tinyworld.model_path())


@pytest.fixture(scope="module")
def models():
    """The shipped tiny model in float32 on the CPU and on the GPU."""
    path = tinyworld.model_path()
    return load_model(path, dtype=torch.float32), load_model(path, dtype=torch.float32, device=CUDA)


@pytest.fixture(scope="module")
def saes():
    return load(tinyworld.sae_path()), load(tinyworld.sae_path(), device=CUDA)


@pytest.fixture(scope="module")
def tokens(tok):
    ids = [tok.encode(r.text, bos=True)[:24] for r in tinyworld.sentences(8, seed=3, split="heldout")]
    ids = [row + [0] * (24 - len(row)) for row in ids]
    return torch.tensor(ids)


def test_forward_and_capture_match_the_cpu(models, tokens):
    cpu, gpu = models
    with torch.inference_mode():
        want, got = cpu(tokens), gpu(tokens.to(CUDA))
        assert got.device.type == torch.device(CUDA).type
        assert rel(got, want) < 1e-4
        hooks = ["resid_post.0", "attn_in.3", "resid_post.5"]
        a, b = cpu.capture(tokens, hooks), gpu.capture(tokens.to(CUDA), hooks)
    for h in hooks:
        assert rel(b[h], a[h]) < 1e-4, h


def test_bf16_model_on_the_gpu_stays_close_to_float32(models, tokens):
    gpu_bf16 = load_model(tinyworld.model_path(), device=CUDA)  # the checkpoint's dtype
    assert gpu_bf16.dtype == torch.bfloat16
    with torch.inference_mode():
        err = rel(gpu_bf16(tokens.to(CUDA)), models[0](tokens))
    assert err < 3e-2  # bf16 operands through 6 blocks


def test_exact_splice_reproduces_the_logits_bit_for_bit(models, saes, tokens):
    gpu, sae = models[1], saes[1]
    x = tokens.to(CUDA)
    with torch.inference_mode():
        clean = gpu(x)
        with spliced(gpu, sae):
            assert torch.equal(gpu(x), clean)
        with spliced(gpu, sae, error_term=False):
            recon = gpu(x)
        with spliced(models[0], saes[0], error_term=False):
            recon_cpu = models[0](tokens)
    assert not torch.equal(recon, clean)
    assert rel(recon, recon_cpu) < 1e-3  # near-tie TopK choices may differ; the logits barely move


def test_sae_encode_decode_match_the_cpu_and_bf16_selection_recomputes_in_float32(models, saes, tokens):
    from llama_sae.sae.model import normalize

    sae = saes[1]
    hook = sae.cfg.hook_name
    with torch.inference_mode():
        x = models[0].capture(tokens, [hook])[hook].flatten(0, 1)
        lat_cpu, lat_gpu = saes[0].encode(x), sae.encode(x.to(CUDA))
        assert rel(lat_gpu, lat_cpu) < 1e-4
        assert rel(sae.decode(lat_gpu), saes[0].decode(lat_cpu)) < 1e-4
        xc = normalize(x.to(CUDA), sae.cfg.normalize_activations)[0] - sae.b_dec
        v32, i32 = sae.select(xc)
        v16, i16 = sae.select(xc, torch.bfloat16)
        pre = xc.double() @ sae.W_enc.double().T + sae.b_enc.double()  # float64 pre-activations
    same = (i16.sort(-1).values == i32.sort(-1).values).all(-1)  # rows whose chosen set is the float32 one
    assert same.float().mean() > 0.7  # near-ties in bf16 may swap the k-th latent (SAE.select)
    chosen = pre.gather(1, i16).relu()
    assert float((v16.double() - chosen).abs().max()) < 1e-4 * float(chosen.abs().max())
    assert rel(v16[same].sort(-1).values, v32[same].sort(-1).values) < 1e-5


def test_cached_generation_equals_uncached_spliced_and_not(models, saes, tok):
    gpu, sae = models[1], saes[1]
    prompts = [p for p, _ in tinyworld.topic_prompts()[:3]]

    def run(use_cache):
        return [c.tokens for c in generate(gpu, tok, prompts, max_new_tokens=16, stop_ids=set(), use_cache=use_cache)]

    with torch.inference_mode():
        assert run(True) == run(False)
        with spliced(gpu, sae, error_term=False):
            assert run(True) == run(False)


def test_greedy_text_matches_the_cpu(models, tok):
    prompts = [p for p, _ in tinyworld.topic_prompts()[::5][:4]]
    cpu = [o.text for o in generate(models[0], tok, prompts, max_new_tokens=20)]
    gpu = [o.text for o in generate(models[1], tok, prompts, max_new_tokens=20)]
    assert gpu == cpu


def test_sampling_on_the_gpu_is_seeded(models, tok):
    prompts = ["The"] * 2
    one = [o.text for o in generate(models[1], tok, prompts, max_new_tokens=12, temperature=1.0, seed=7)]
    two = [o.text for o in generate(models[1], tok, prompts, max_new_tokens=12, temperature=1.0, seed=7)]
    assert one == two


def test_steering_on_the_gpu_raises_the_latent_and_matches_the_cpu(models, saes, tok):
    from llama_sae.features import load_features
    from llama_sae.steer import build_steering, parse_steers
    from llama_sae.steer import generate as steered_generate

    feats = load_features(tinyworld.features_path())
    prompts = [p for p, _ in tinyworld.topic_prompts()[:2]]
    outs = []
    for model, sae in zip(models, saes):
        hook = sae.cfg.hook_name
        steering = build_steering(model, tok, {hook: sae}, parse_steers(["5:add:6:last", "9:clamp:0"]),
                                  features={hook: feats})
        outs.append([o.text for o in steered_generate(model, tok, prompts, steering, max_new_tokens=12)])
    assert outs[1] == outs[0]


def test_evaluation_on_the_gpu_matches_the_cpu(models, saes, tok):
    from llama_sae.sae.evaluate import activation_metrics, model_metrics, token_batches

    texts = [d.text for d in tinyworld.documents(24, seed=5, split="heldout")]
    reports = []
    for model, sae in zip(models, saes):
        hook = sae.cfg.hook_name
        with torch.inference_mode():
            acts = [model.capture(t.to(model.device), [hook])[hook].flatten(0, 1)
                    for t, _ in token_batches(tok, texts)]
        report = activation_metrics(sae, acts)
        report.update(model_metrics(model, sae, token_batches(tok, texts)))
        reports.append(report)
    cpu, gpu = reports
    for key in ("fvu", "mse", "l0", "ce_clean", "ce_spliced", "ce_zero_ablated", "ce_recovered", "kl"):
        assert math.isclose(gpu[key], cpu[key], rel_tol=2e-3, abs_tol=1e-5), (key, gpu[key], cpu[key])


def test_capture_train_and_features_on_the_gpu(tmp_path: Path, models, tok):
    """The store a GPU captures holds the CPU's activations; an SAE trained on the GPU learns what one trained on
    the CPU learns; the features of an SAE built on the GPU pick the CPU's top sentences."""
    from llama_sae.capture import capture, capture_config
    from llama_sae.features import build_features, load_features
    from llama_sae.sae.evaluate import activation_metrics
    from llama_sae.sae.train import load_config, train
    from llama_sae.store import ActivationStore

    hook = "resid_post.2"
    devices = ("cpu", CUDA)  # (both "cpu" in the self-check: hence directories by position, not by name)
    stores = []
    for i, dev in enumerate(devices):
        cfg = capture_config(model=str(tinyworld.model_path()), corpus="tinyworld:3000", hooks=[hook], tokens=30_000,
                             out=str(tmp_path / f"store{i}"), context=64, batch_tokens=4096, device=dev,
                             dtype="float32")
        stores.append(capture(cfg).path)
    a, b = (next(iter(ActivationStore(s).loader(8192, shuffle=False, split="train", epochs=1, hook=hook)))
            for s in stores)
    assert a.shape == b.shape and rel(b, a) < 1e-2  # the store holds bf16 rows; float32 model on both sides

    fvu, sae_dirs = [], []
    val = list(ActivationStore(stores[0]).loader(4096, shuffle=False, split="val", epochs=1, drop_last=False,
                                                 hook=hook))
    for i, dev in enumerate(devices):
        cfg = load_config(d_sae=256, k=16, batch_size=1024, epochs=2, log_every=5, checkpoint_every=1000,
                          plots=False, hook=hook, device=dev, seed=0)
        (sae_dir,) = train(stores[i], tmp_path / f"sae{i}", cfg)
        sae_dirs.append(sae_dir)
        fvu.append(activation_metrics(load(sae_dir, device=dev), [x.to(dev) for x in val])["fvu"])
    assert fvu[1] < 0.5 and abs(fvu[1] - fvu[0]) < 0.05, fvu

    feats = []
    for i, (dev, model) in enumerate(zip(devices, models)):  # the CPU-trained SAE, on each device
        path = build_features(model, tok, load(sae_dirs[0], device=dev), "tinyworld:600:heldout",
                              tmp_path / f"feat{i}", sentences=600, top_n=5, batch_size=32)
        feats.append(load_features(path))
    live = feats[0].live_latents()
    assert live and live == feats[1].live_latents()
    same = sum(feats[0].examples(i)[0].text == feats[1].examples(i)[0].text for i in live[:100])
    assert same >= 0.95 * min(100, len(live)), same
