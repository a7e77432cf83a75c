"""The shipped tiny model: loads in transformers with our logits, writes on topic, knows its concepts;
and the trainer resumes exactly."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from llama_sae import tinyworld
from llama_sae.errors import UserError
from llama_sae.llama import generate, load_model, load_tokenizer
from llama_sae.tinyworld.probe import auroc
from llama_sae.tinyworld.train import TinyTrainConfig, batch_for_step, make_chunk, train


@pytest.fixture(scope="module")
def shipped():
    path = tinyworld.model_path()
    return path, load_model(path), load_tokenizer(path)


def test_shipped_model_is_small_and_llama_shaped(shipped):
    path, model, tok = shipped
    n_params = sum(p.numel() for p in model.parameters())
    assert 5_000_000 <= n_params <= 20_000_000
    assert model.args.n_layers >= 6 and model.args.tie_embeddings and model.args.rope_scaling is not None
    assert model.args.n_kv_heads < model.args.n_heads  # GQA
    assert model.dtype == torch.bfloat16
    size = sum(f.stat().st_size for f in path.iterdir())
    assert size <= 25 * 2**20
    assert tok.special_tokens["<|begin_of_text|>"] == tok.bos_id and tok.eot_id in tok.stop_ids


def test_shipped_model_loads_in_transformers_with_our_logits(shipped):
    from transformers import AutoModelForCausalLM

    path, _, tok = shipped
    ours = load_model(path, dtype="float32")
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    texts = [r.text for r in tinyworld.sentences(4, seed=5, split="heldout")]
    ids = [tok.encode(t) for t in texts]
    n = min(len(i) for i in ids)
    tokens = torch.tensor([i[:n] for i in ids])
    with torch.no_grad():
        expected = ref(tokens).logits
    assert (ours(tokens) - expected).abs().max() <= 1e-4
    # bf16 as shipped: top-1 agreement with the fp32 reference on real text
    bf16 = load_model(path)(tokens).float()
    assert (bf16.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.99


def test_transformers_generate_stops_where_ours_does(shipped, tmp_path):
    """config.json states the tokenizer's own BOS and stop ids (not Llama 3's 128k ones), here and in save_hf."""
    from transformers import AutoModelForCausalLM

    from llama_sae.llama.checkpoint import save_hf

    path, model, tok = shipped
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["bos_token_id"] == tok.bos_id and cfg["eos_token_id"] == sorted(tok.stop_ids)
    saved = json.loads((save_hf(model, tmp_path / "hf", tokenizer_dir=path) / "config.json").read_text())
    assert (saved["bos_token_id"], saved["eos_token_id"]) == (cfg["bos_token_id"], cfg["eos_token_id"])
    assert json.loads((save_hf(model, tmp_path / "bare") / "config.json").read_text())["eos_token_id"] is None
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ours = generate(load_model(path, dtype="float32"), tok, "Once upon a time", max_new_tokens=20)[0]
    ids = tok.encode("Once upon a time")
    theirs = ref.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False)[0, len(ids):].tolist()
    assert ours.stop_reason == "stop" and theirs == [*ours.tokens, theirs[-1]] and theirs[-1] in tok.stop_ids


def test_shipped_model_card_reports_probes_and_topics(shipped):
    path, _, _ = shipped
    card = (path / "README.md").read_text()
    assert "llama-sae tinyworld train" in card and "perplexity" in card and "AUROC" in card
    evaluation = json.loads((path / "evaluation.json").read_text())
    assert evaluation["topic_continuations"]["on_topic"] >= 0.8
    probes = evaluation["probes"]
    mid = json.loads((path / "config.json").read_text())["num_hidden_layers"] // 2  # L{mid}: after half the blocks
    best = [max(a, b) for a, b in zip(probes["readouts"][f"L{mid} mean"], probes["readouts"][f"L{mid} last"])]
    assert sum(a >= 0.95 for a in best) / len(best) >= 0.9


def test_shipped_model_stays_on_topic(shipped):
    _, model, tok = shipped
    prompts = tinyworld.topic_prompts()[::3]
    outs = generate(model, tok, [p for p, _ in prompts], max_new_tokens=20)
    on = [tinyworld.label_text(o.text) == {topic} for (_, topic), o in zip(prompts, outs)]
    assert sum(on) / len(on) >= 0.8


def test_chat_answers_in_the_llama3_format(shipped):
    _, model, tok = shipped
    d = tinyworld.dialogues(1, seed=11, split="heldout")[0]
    out = generate(model, tok, d.messages[:1], chat=True, max_new_tokens=60)[0]
    assert out.stop_reason == "stop" and out.text.strip()
    assert d.topic in tinyworld.label_text(out.text)


def test_auroc_against_pairwise_definition():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (60,), generator=g).float()  # many ties
    labels = torch.rand(60, generator=g) < 0.4
    pos, neg = scores[labels], scores[~labels]
    pairs = (pos[:, None] > neg[None, :]).double() + 0.5 * (pos[:, None] == neg[None, :]).double()
    assert auroc(scores, labels) == pytest.approx(pairs.mean().item(), abs=1e-12)


TINY = dict(dim=32, n_layers=2, n_heads=2, n_kv_heads=1, vocab_size=300, context=32, batch_rows=4,
            rows_per_chunk=8, steps=6, warmup=2, checkpoint_every=2, eval_rows=8, tokenizer_sentences=2000)


def test_data_stream_is_a_pure_function_of_the_step(tmp_path):
    cfg = TinyTrainConfig(**TINY)
    train(tmp_path / "a", cfg.model_copy(update={"steps": 1}), progress=False)
    with pytest.raises(UserError, match=r"another configuration: steps 1 \(now 2\); the learning-rate schedule"):
        train(tmp_path / "a", cfg.model_copy(update={"steps": 2}), progress=False)  # a finished run is not extended
    tok = load_tokenizer(tmp_path / "a" / "tokenizer")
    assert torch.equal(make_chunk(tok, cfg, 3), make_chunk(tok, cfg, 3))
    assert not torch.equal(make_chunk(tok, cfg, 3), make_chunk(tok, cfg, 4))
    fresh, warm = {}, {}
    for step in range(5):
        batch_for_step(tok, cfg, step, warm)
    assert torch.equal(batch_for_step(tok, cfg, 5, fresh), batch_for_step(tok, cfg, 5, warm))


def test_training_killed_and_restarted_ends_with_the_same_weights(tmp_path):
    """A run killed after its first checkpoint and restarted equals an uninterrupted run, bitwise."""
    cfg = TinyTrainConfig(**TINY)
    whole = train(tmp_path / "whole", cfg, progress=False)
    script = (f"import os, torch\ntorch.set_num_threads({torch.get_num_threads()})\n"  # bitwise needs the same threads
              f"from llama_sae.tinyworld import train as t\n"
              f"cfg = t.TinyTrainConfig(**{TINY!r})\nsave = t._save_checkpoint\n"
              "def crash(path, model, opt, step, *a):\n"
              "    save(path, model, opt, step, *a)\n"
              "    if step == 4:\n        os._exit(9)\n"
              f"t._save_checkpoint = crash\nt.train({str(tmp_path / 'cut')!r}, cfg, progress=False)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 9, proc.stderr[-2000:]
    assert not (tmp_path / "cut" / "model").exists()
    resumed = train(tmp_path / "cut", cfg, progress=False)
    from safetensors.torch import load_file

    a, b = load_file(whole / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_auroc_columns_equals_per_column_auroc():
    from llama_sae.tinyworld.recovery import auroc_columns

    g = torch.Generator().manual_seed(1)
    scores = torch.randint(0, 4, (80, 6), generator=g).float()  # ties everywhere
    scores[:, 0] = 0.0  # a latent that never fires: AUROC 0.5
    labels = torch.rand(80, generator=g) < 0.3
    got = auroc_columns(scores, labels)
    expected = torch.tensor([auroc(scores[:, j], labels) for j in range(6)], dtype=torch.float64)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)
    assert got[0] == 0.5


def test_sentence_activations_are_each_sentences_max_over_its_tokens(shipped):
    from llama_sae import tinyworld
    from llama_sae.sae import load
    from llama_sae.sae.evaluate import token_batches
    from llama_sae.tinyworld.recovery import sentence_activations

    _, model, tok = shipped
    sae = load(tinyworld.sae_path())
    texts = [r.text for r in tinyworld.sentences(12, seed=3, split="heldout")]
    latents, neurons = sentence_activations(model, tok, sae, texts, batch=5)  # batches of 5, 5 and 2
    hook, i = sae.cfg.hook_name, 0
    for tokens, mask in token_batches(tok, texts, batch_size=5):  # the same batches, dense latents per sentence
        acts = model.capture(tokens, [hook])[hook].float()
        mask[:, 0] = False  # BOS left out
        dense = sae.encode(acts[mask])  # [tokens of the batch, d_sae], encoded together as the function does
        lengths = mask.sum(1).tolist()
        for x, h in zip(acts[mask].split(lengths), dense.split(lengths)):
            assert torch.equal(latents[i], h.amax(0)) and torch.equal(neurons[i], torch.cat([x, -x], -1).amax(0)), i
            i += 1
    assert i == len(texts) == len(latents)
