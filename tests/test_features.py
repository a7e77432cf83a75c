"""The features artifact against a brute-force dense recomputation, resuming, and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from llama_sae import tinyworld
from llama_sae.corpus import Corpus
from llama_sae.errors import UserError
from llama_sae.features import build_features, load_features, merge_top_, sae_fingerprint
from llama_sae.llama import load_model, load_tokenizer
from llama_sae.sae.model import SAE, SAEConfig

HOOK = "resid_post.2"
SOURCE = "tinyworld:240:heldout"


def small_sae(model, d_sae: int = 48, k: int = 4, seed: int = 0) -> SAE:
    """An untrained TopK SAE initialised from real activations (its latents fire on real sentences)."""
    tok = load_tokenizer(tinyworld.model_path())
    texts = [r.text for r in tinyworld.sentences(32, seed=seed + 11, split="train")]
    rows = [model.capture(torch.tensor([tok.encode(t)]), [HOOK])[HOOK][0, 1:] for t in texts]
    g = torch.Generator().manual_seed(seed)
    sae = SAE(SAEConfig(d_in=model.args.dim, d_sae=d_sae, k=k, normalize_activations="layer_norm", hook_name=HOOK))
    sae.init_(torch.cat(rows).float(), generator=g)
    return sae


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model = load_model(tinyworld.model_path(), dtype="float32")
    tok = load_tokenizer(tinyworld.model_path())
    sae = small_sae(model)
    out = tmp_path_factory.mktemp("features")
    build_features(model, tok, sae, SOURCE, out, sentences=200, top_n=5, reservoir=8, pool=32, n_quantiles=4,
                   batch_size=16)
    return model, tok, sae, out


def _dense_reference(model, tok, sae, texts):
    """Per sentence: dense token latents [T, d_sae] (BOS excluded), computed one sentence at a time."""
    out = []
    for text in texts:
        ids = torch.tensor([tok.encode(text, bos=True)[:128]])
        x = model.capture(ids, [HOOK])[HOOK][0, 1:].float()
        out.append(sae.encode(x).double())
    return out


def test_top_sentences_stats_and_token_acts_match_dense_reference(setup):
    model, tok, sae, out = setup
    f = load_features(out)
    texts = [s.text for s in Corpus(SOURCE).take(200)]
    dense = _dense_reference(model, tok, sae, texts)
    agg = {"max": torch.stack([d.max(0).values for d in dense]), "mean": torch.stack([d.mean(0) for d in dense]),
           "last": torch.stack([d[-1] for d in dense])}  # [S, d_sae]
    tokens = torch.cat(dense)
    assert f.meta["sentences"] == 200 and f.meta["tokens"] == tokens.shape[0]
    torch.testing.assert_close(f.frequency.double(), (tokens > 0).double().mean(0), atol=1e-7, rtol=0)
    live = f.live_latents()
    assert live == ((tokens > 0).any(0)).nonzero()[:, 0].tolist() and len(live) > 10
    checked = with_random = 0
    for latent in live:
        counts = f.histogram(latent)[1]
        assert counts.sum() == int((tokens[:, latent] > 0).sum())
        for kind in ("max", "mean", "last"):
            col = agg[kind][:, latent]
            ref = col[col > 0].sort(descending=True).values[:5]
            got = f.examples(latent, kind)
            assert [e.activation for e in got] == pytest.approx(ref.tolist(), rel=1e-4, abs=1e-5)
            for e in got:  # per-token activations for highlighting, and the sentence each example names
                assert e.text == texts[e.sentence]
                assert e.acts == pytest.approx(dense[e.sentence][:, latent].tolist(), rel=1e-4, abs=1e-5)
                assert "".join(e.tokens) == e.text
                checked += 1
        top = agg["max"][:, latent]
        assert float(f.typical_max[latent]) == pytest.approx(float(top[top > 0].sort(descending=True).values[:5]
                                                                   .mean()), rel=1e-4)
        quant = f.examples(latent, "quantile")
        assert len(quant) == min(8, int((top > 0).sum()))
        assert all(top[e.sentence] > 0 for e in quant)
        assert [e.activation for e in quant] == sorted(e.activation for e in quant)
        assert [e.quantile for e in quant] == sorted(e.quantile for e in quant)
        rand = f.examples(latent, "random", n=6)
        assert all(top[e.sentence] == 0 and set(e.acts) == {0.0} for e in rand)
        with_random += len(rand) == 6
    assert checked > 100 and with_random > len(live) // 2


def test_resume_after_kill_gives_identical_artifact(setup, tmp_path):
    model, tok, sae, out = setup

    class Killed(Exception):
        pass

    def kill_after(done, total):
        if done >= 100:
            raise Killed

    with pytest.raises(Killed):
        build_features(model, tok, sae, SOURCE, tmp_path, sentences=200, top_n=5, reservoir=8, pool=32,
                       n_quantiles=4, batch_size=8, checkpoint_every=40, progress=kill_after)
    with pytest.raises(UserError, match="interrupted"):
        load_features(tmp_path)
    shard = sorted((tmp_path / ".features-partial").glob("codes-*.safetensors"))[2]
    shard.write_bytes(shard.read_bytes()[:100])  # a damaged cache shard: its sentences are recomputed
    seen = []  # resumed without a code cache: pass 2 reads the killed run's kept batches, runs the model for the rest
    second = []  # pass 2 reports too (it used to show nothing while it ran the model again)
    build_features(model, tok, sae, SOURCE, tmp_path, sentences=200, top_n=5, reservoir=8, pool=32,
                   n_quantiles=4, batch_size=8, checkpoint_every=40, cache_bytes=0,
                   progress=lambda d, n: seen.append(d), pass2_progress=lambda d, n: second.append((d, n)))
    assert seen[0] > 80  # resumed from the checkpoint, not from zero
    a, b = load_features(out), load_features(tmp_path)
    assert len(second) > 2 and second[-1] == (b.meta["stored_sentences"],) * 2
    assert all(x[0] <= y[0] for x, y in zip(second, second[1:]))
    assert a.meta["text_sha256"] == b.meta["text_sha256"] and len(a.meta["text_sha256"]) == 64
    for name, t in a._t.items():  # a different batch size and a kill change nothing
        torch.testing.assert_close(torch.tensor(b._t[name]), torch.tensor(t), msg=name, atol=1e-5, rtol=1e-5)
    # killed after the artifact was written but before the partial directory went: the rerun finishes the job
    (tmp_path / ".features-partial").mkdir()
    (tmp_path / ".features-partial" / "codes-000000000000-000000000007.safetensors").write_bytes(b"x" * 100)
    (tmp_path / ".features.json.tmp4242").write_text("{")
    build_features(model, tok, sae, SOURCE, tmp_path, sentences=200, top_n=5, reservoir=8, pool=32,
                   n_quantiles=4, batch_size=8, checkpoint_every=40)
    assert not (tmp_path / ".features-partial").exists() and not list(tmp_path.glob(".*.tmp*"))


def test_pass_2_reports_sentences_read_from_the_code_cache(setup, tmp_path, monkeypatch):
    from llama_sae import features

    model, tok, sae, _ = setup
    monkeypatch.setattr(features, "PASS2_REPORT_EVERY", 8)
    second = []  # every sentence comes from the code cache: no model batch runs in pass 2
    build_features(model, tok, sae, SOURCE, tmp_path, sentences=200, top_n=5, reservoir=8, pool=32, n_quantiles=4,
                   batch_size=16, pass2_progress=lambda d, n: second.append(d))
    assert len(second) > 3 and second == sorted(second)  # it used to report only at the end


def test_interrupted_build_of_another_sae_is_discarded(setup, tmp_path):
    model, tok, sae, _ = setup
    other = small_sae(model, seed=2)

    def kill(done, total):
        if done >= 64:
            raise KeyboardInterrupt

    kw = dict(sentences=96, top_n=4, reservoir=4, pool=16, n_quantiles=2, batch_size=16, checkpoint_every=32)
    with pytest.raises(KeyboardInterrupt):
        build_features(model, tok, sae, SOURCE, tmp_path / "a", progress=kill, **kw)
    build_features(model, tok, other, SOURCE, tmp_path / "a", **kw)  # same directory, another SAE
    build_features(model, tok, other, SOURCE, tmp_path / "b", **kw)  # a clean build
    a, b = load_features(tmp_path / "a"), load_features(tmp_path / "b")
    assert a.sae_fingerprint == sae_fingerprint(other)
    for name, t in b._t.items():
        assert np.array_equal(a._t[name], t), name


def test_bad_input(setup, tmp_path):
    model, tok, sae, out = setup
    f = load_features(out)
    from safetensors.numpy import load_file  # the library's own reader: the memory-mapped columns match it
    reference = load_file(out / "features.safetensors")
    assert reference.keys() == f._t.keys() and all(np.array_equal(reference[k], f._t[k]) for k in reference)
    other = small_sae(model, seed=1)
    assert f.sae_fingerprint == sae_fingerprint(sae) != sae_fingerprint(other)
    f.check_sae(sae)
    with pytest.raises(UserError, match="another SAE"):
        f.check_sae(other)
    with pytest.raises(UserError, match="other settings"):
        build_features(model, tok, other, SOURCE, out, sentences=200)
    with pytest.raises(UserError, match="top_n must be at least 1, not 0"):
        build_features(model, tok, sae, SOURCE, tmp_path / "new", sentences=200, top_n=0)
    (tmp_path / "an_sae").mkdir()
    (tmp_path / "an_sae" / "cfg.json").write_text("{}")
    with pytest.raises(UserError, match="not empty: it holds cfg.json, which is not part of a features artifact"):
        build_features(model, tok, sae, SOURCE, tmp_path / "an_sae", sentences=200)
    assert not (tmp_path / "new").exists() and sorted(p.name for p in (tmp_path / "an_sae").iterdir()) == ["cfg.json"]
    with pytest.raises(UserError, match="out of range"):
        f.examples(10_000)
    with pytest.raises(UserError, match="unknown example kind"):
        f.examples(0, "top")
    with pytest.raises(UserError, match="no features artifact"):
        load_features(tmp_path)
    (tmp_path / "features.json").write_text(json.dumps(f.meta))
    whole = (out / "features.safetensors").read_bytes()
    for bad in (b"garbage", whole[:len(whole) // 2], whole[:-1], b"\xff" * 8 + whole[8:]):  # truncated, garbled
        (tmp_path / "features.safetensors").write_bytes(bad)
        with pytest.raises(UserError, match="corrupt"):
            load_features(tmp_path)


def test_explanations_and_search_read_from_the_artifact(setup, tmp_path):
    import shutil

    _, _, _, out = setup
    shutil.copytree(out, tmp_path / "f")
    good = json.dumps({"latent": 3, "explanation": "Cooking words", "certainty": 0.8, "backend": "offline"}) + "\n"
    (tmp_path / "f" / "explanations.jsonl").write_text(good + '{"latent": 4, "explan')  # cut short
    (tmp_path / "f" / "scores.jsonl").write_text(
        json.dumps({"latent": 3, "method": "detection", "balanced_accuracy": 0.93}) + "\n")
    with pytest.raises(UserError, match="explanations.jsonl, line 2: not a JSON object"):  # written whole: damage
        load_features(tmp_path / "f").explanation(3)
    (tmp_path / "f" / "explanations.jsonl").write_text(good)
    f = load_features(tmp_path / "f")
    e = f.explanation(3)
    assert (e.text, e.certainty, e.detection, e.fuzzing) == ("Cooking words", 0.8, 0.93, None)
    assert f.explanation(4) is None and f.search("COOK") == [3] and f.search("astronomy") == []


def test_merge_top_keeps_best_per_row_with_stable_ties():
    score = torch.full((3, 2), float("-inf"))
    ids = torch.full((3, 2), -1)
    merge_top_(score, [ids], torch.tensor([0, 0, 0, 2]), torch.tensor([1.0, 3.0, 1.0, 5.0]),
               [torch.tensor([10, 11, 12, 13])])
    assert ids.tolist() == [[11, 10], [-1, -1], [13, -1]]
    merge_top_(score, [ids], torch.tensor([0, 2]), torch.tensor([1.0, 6.0]), [torch.tensor([14, 15])])
    assert ids.tolist() == [[11, 10], [-1, -1], [15, 13]] and score[2].tolist() == [6.0, 5.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_merge_top_matches_a_stable_sort_of_each_row(dtype):
    """Many rounds of tie-heavy candidates: each row ends as a stable sort (best first, older entries first,
    then candidates in their given order) of everything it was offered, cut to N."""
    g = torch.Generator().manual_seed(7)
    R, N = 12, 4
    score, ids, acts = torch.full((R, N), float("-inf"), dtype=dtype), torch.full((R, N), -1), torch.zeros(R, N)
    offered: list[list[tuple[float, int, float]]] = [[] for _ in range(R)]
    for round_ in range(30):
        P = int(torch.randint(0, 25, (1,), generator=g))
        rows = torch.randint(0, R, (P,), generator=g)
        new_score = torch.randint(0, 6, (P,), generator=g).float()  # few values: many ties
        new_ids, new_acts = torch.arange(P) + 100 * round_, torch.rand(P, generator=g)
        merge_top_(score, [ids, acts], rows, new_score, [new_ids, new_acts])
        for r, sc, i, a in zip(rows.tolist(), new_score.tolist(), new_ids.tolist(), new_acts.tolist()):
            offered[r].append((sc, i, a))
        for r in range(R):
            best = sorted(offered[r], key=lambda e: -e[0])[:N]  # Python's sort is stable
            best += [(float("-inf"), -1, None)] * (N - len(best))
            assert score[r].tolist() == [e[0] for e in best] and ids[r].tolist() == [e[1] for e in best]
            assert [a for a, e in zip(acts[r].tolist(), best) if e[2] is not None] == \
                [e[2] for e in best if e[2] is not None]


def test_cli_builds_and_reports(setup, tmp_path):
    from typer.testing import CliRunner

    from llama_sae.cli import app

    _, _, sae, _ = setup
    sae.save(tmp_path / "sae")
    result = CliRunner().invoke(app, ["features", "--sae", str(tmp_path / "sae"), "--out", str(tmp_path / "f"),
                                      "--corpus", SOURCE, "--sentences", "40", "--top-n", "3", "--pool", "8",
                                      "--no-progress"])
    assert result.exit_code == 0, result.output
    f = load_features(tmp_path / "f")
    assert f.meta["sentences"] == 40 and f.meta["sae_path"] == str(tmp_path / "sae")
    assert f"{f.meta['live_latents']} of 48 latents fired" in result.output.replace("\n", " ")
    args = ["features", "--sae", str(tmp_path / "sae"), "--out", str(tmp_path / "f"), "--corpus", SOURCE,
            "--sentences", "40", "--top-n", "3", "--pool", "8", "--no-progress"]
    same = CliRunner().invoke(app, [*args, "--no-split-sentences"])  # what the rule decides for tinyworld anyway
    assert same.exit_code == 0 and load_features(tmp_path / "f").meta["build_id"] == f.meta["build_id"]
    other = CliRunner().invoke(app, [*args, "--split-sentences"])  # another text: another artifact
    assert other.exit_code != 0 and "built with other settings (split_sentences)" in str(other.exception)
    float32 = CliRunner().invoke(app, [*args, "--dtype", "float32"])  # another model dtype: another artifact
    assert float32.exit_code != 0 and "built with other settings (model_dtype)" in str(float32.exception)
    repeats = tmp_path / "repeats.txt"
    repeats.write_text("The cat sat on the mat.\n" * 30 + "A dog ran in the park.\n" * 30)
    deduped = CliRunner().invoke(app, ["features", "--sae", str(tmp_path / "sae"), "--out", str(tmp_path / "d"),
                                       "--corpus", f"txt:{repeats}", "--dedupe", "--top-n", "3", "--pool", "8",
                                       "--no-progress"])
    assert deduped.exit_code == 0, deduped.output
    assert load_features(tmp_path / "d").meta["sentences"] == 2
    dropped = CliRunner().invoke(app, ["features", "--sae", str(tmp_path / "sae"), "--out", str(tmp_path / "d"),
                                       "--corpus", f"txt:{repeats}", "--top-n", "3", "--pool", "8", "--no-progress"])
    assert "built with other settings (dedupe)" in str(dropped.exception)  # a flag left out is named too


def test_fingerprint_is_kept_until_the_weights_change(setup):
    import hashlib
    import json

    from llama_sae.sae import SAE

    _, _, sae, _ = setup
    fresh = SAE(sae.cfg)
    fresh.load_state_dict(sae.state_dict())
    digest = hashlib.sha256(json.dumps(fresh.cfg.model_dump(), sort_keys=True).encode())
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        digest.update(getattr(fresh, name).detach().numpy().tobytes())
    assert sae_fingerprint(fresh) == sae_fingerprint(fresh) == digest.hexdigest()[:16]  # the format is unchanged
    with torch.no_grad():
        fresh.b_dec.add_(1.0)  # in place, version bumped: recomputed
    changed = sae_fingerprint(fresh)
    assert changed != digest.hexdigest()[:16]
    fresh.b_enc.data.add_(1.0)  # through .data (or fused AdamW): no version bump, seen by the checksums
    assert sae_fingerprint(fresh) != changed
    changed = sae_fingerprint(fresh)
    fresh.W_enc.data[[3, 7]] = fresh.W_enc.data[[7, 3]].clone()  # two latents swapped: the same sum
    assert sae_fingerprint(fresh) != changed
    changed = sae_fingerprint(fresh)
    fresh.W_dec.data[5] = 0  # an ablation, the usual way
    assert sae_fingerprint(fresh) != changed
    with torch.no_grad():
        x = torch.randn(6, sae.cfg.d_in)
        picks = fresh.select(x, torch.bfloat16)[1]  # builds the cached bf16 encoder matrix
        lat = int(picks[0, 0])
        fresh.W_enc.data[lat], fresh.b_enc.data[lat] = 0, -100
        assert (picks[0] == lat).any() and not (fresh.select(x, torch.bfloat16)[1] == lat).any()



def test_overwrite_sets_the_old_explanations_aside(setup, tmp_path):
    """A rebuild with --overwrite must not show the old build's explanations and scores as the new one's."""
    import shutil

    model, tok, sae, out = setup
    shutil.copytree(out, tmp_path / "f")
    (tmp_path / "f" / "explanations.jsonl").write_text(json.dumps({"latent": 0, "explanation": "old"}) + "\n")
    (tmp_path / "f" / "scores.jsonl").write_text(json.dumps({"latent": 0, "balanced_accuracy": 0.9}) + "\n")
    old_build = load_features(tmp_path / "f").meta["build_id"]
    assert load_features(tmp_path / "f").explanation(0).text == "old"
    build_features(model, tok, sae, SOURCE, tmp_path / "f", sentences=40, top_n=3, overwrite=True)
    f = load_features(tmp_path / "f")
    assert f.meta["sentences"] == 40 and f.explanation(0) is None
    assert (tmp_path / "f" / f"explanations.{old_build}.jsonl").exists()
    assert (tmp_path / "f" / f"scores.{old_build}.jsonl").exists()


@pytest.mark.parametrize("chunk", [1, 7, 1 << 20])
def test_piece_blob_is_each_tokens_own_decode(chunk):
    """The pieces blob equals the UTF-8 of ``decode([id])`` per token, for the Llama 3 tokenizer's byte-level
    tokens (a token that is part of a character decodes to U+FFFD), across chunk boundaries."""
    from test_tokenizer import meta_tokenizer_model_path

    from llama_sae.features import piece_blob_of
    from llama_sae.llama.tokenizer import TiktokenLlama3Tokenizer

    tok = TiktokenLlama3Tokenizer(meta_tokenizer_model_path())
    ids = tok.encode("naïve café — 東京 🦙 ok", bos=False) + tok.encode(" ok ok", bos=False) + [0]
    pieces = [tok.decode([t]).encode("utf-8") for t in ids]
    assert any(b"\xef\xbf\xbd" in p for p in pieces)  # some token is a partial character
    blob, offsets = piece_blob_of(tok, np.array(ids, dtype=np.int32), chunk=chunk)
    assert bytes(blob.numpy()) == b"".join(pieces)
    assert offsets.tolist() == np.cumsum([0] + [len(p) for p in pieces]).tolist()
    empty_blob, empty_off = piece_blob_of(tok, np.zeros(0, dtype=np.int32))
    assert len(empty_blob) == 0 and empty_off.tolist() == [0]


@pytest.mark.parametrize("backend", ["tiktoken", "tokenizer.json"])
def test_pieces_of_sentences_join_up_to_their_text(backend, tmp_path):
    """With sentence lengths, a split character shows on the token that completes it (as the UI shows it): the
    pieces join up to each sentence, and sentences without one keep each token's own decode."""
    from test_tokenizer import meta_tokenizer_model_path

    from llama_sae.features import piece_blob_of
    from llama_sae.llama.tokenizer import HFTokenizer, TiktokenLlama3Tokenizer, write_hf_tokenizer_json

    tok = TiktokenLlama3Tokenizer(meta_tokenizer_model_path())
    if backend == "tokenizer.json":
        pytest.importorskip("transformers.convert_slow_tokenizer")
        tok = HFTokenizer(write_hf_tokenizer_json(meta_tokenizer_model_path(), tmp_path))
    texts = ["plain words only", "naïve café 🦙 — 東京 𝔘", "", "ok 🦙🦙"]
    sentences = [tok.encode(t, bos=False) for t in texts]
    assert any("\ufffd" in tok.decode([i]) for i in sentences[1])  # a character is split across tokens
    blob, offsets = piece_blob_of(tok, np.array([i for s in sentences for i in s], dtype=np.int32),
                                  lengths=[len(s) for s in sentences])
    pieces = [bytes(blob[a:b].numpy()).decode("utf-8") for a, b in zip(offsets[:-1], offsets[1:])]
    at = np.cumsum([0] + [len(s) for s in sentences])
    assert ["".join(pieces[at[i]:at[i + 1]]) for i in range(len(texts))] == texts
    assert pieces[:at[1]] == [tok.decode([i]) for i in sentences[0]]


def test_decoded_pieces_are_cached_but_every_caller_gets_its_own_list(monkeypatch):
    import llama_sae.features as features_mod

    f = load_features(tinyworld.features_path())
    latent = f.live_latents()[0]
    first = f.examples(latent)
    first[0].tokens.append("garbage")  # a caller that edits its example must not change what others read
    again = f.examples(latent)
    assert [e.tokens for e in again] == [e.tokens for e in load_features(tinyworld.features_path()).examples(latent)]
    assert "garbage" not in again[0].tokens and "".join(again[0].tokens).strip() == again[0].text.strip()
    monkeypatch.setattr(features_mod, "PIECES_CACHE", 2)  # a full cache is emptied, not grown
    for i in f.live_latents()[:20]:
        f.examples(i)
    assert len(f._pieces_cache) <= 2
