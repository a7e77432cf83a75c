"""Steering: specs, the three edits through the splice, positions, cached vs uncached, records."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import VOCAB
from test_splice import _sae, _tokens

from llama_sae.errors import UserError
from llama_sae.llama import load_model
from llama_sae.llama.generate import generate_tokens
from llama_sae.steer import Steer, Steering, parse_steer, parse_steers

HOOK = "resid_post.1"


@pytest.fixture(scope="module")
def model(hf_checkpoints):
    return load_model(hf_checkpoints["gqa-tied-f32"][1])


@pytest.fixture(scope="module")
def sae(model):
    return _sae(model, HOOK)


def _steering(sae, specs, unit=1.0, **kw):
    return Steering({HOOK: sae}, parse_steers(specs), {HOOK: torch.full((sae.cfg.d_sae,), unit)}, **kw)


def _active(model, sae, tokens):
    """Dense latents [B, T, d_sae] of the SAE on the model's activations."""
    x = model.capture(tokens, [HOOK])[HOOK]
    return sae.encode(x.reshape(-1, x.shape[-1])).view(*x.shape[:2], -1)


def test_parse_specs_and_round_trip():
    assert parse_steer("123:clamp:8") == Steer(123, "clamp", 8.0)
    assert parse_steer("77:add:-3") == Steer(77, "add", -3.0)
    s = parse_steer("resid_post.2@5:bias:2.5:generated")
    assert s == Steer(5, "bias", 2.5, "generated", "resid_post.2")
    assert parse_steer(s.spec) == s
    for positions in ("last", "last+3", "prompt+1"):
        s = parse_steer(f"5:add:2:{positions}")
        assert s.positions == positions and parse_steer(s.spec) == s
    assert [x.latent for x in parse_steers("1:add:1, 2:clamp:0")] == [1, 2]


@pytest.mark.parametrize("spec, message", [
    ("123:clamp", "has 2 field"),
    ("abc:add:1", "not a non-negative integer"),
    ("-4:add:1", "not a non-negative integer"),
    ("12:boost:1", "kind 'boost'"),
    ("12:add:lots", "not a number"),
    ("12:add:nan", "finite"),
    ("12:add:1:sometimes", "positions 'sometimes'"),
    ("1:2:3:4:5", "has 5 field"),
    ("12:add:1:all+2", "positions 'all\\+2'"),
    ("12:add:1:last+", "positions 'last\\+'"),
    ("12:add:1:last-1", "last\\+N or prompt\\+N"),
    ("foo@5:add:2", "'foo' is not a hook point: write KIND.LAYER@ before the latent"),
    ("foo.3@5:add:2", "'foo.3' is not a hook point: write KIND.LAYER@ with KIND one of resid_pre"),
    ("5:add:1:last+99999999999999999999", "reaches past any context: for every generated token write 'generated'"),
])
def test_parser_rejects_malformed_specs(spec, message):
    with pytest.raises(UserError, match=message):
        parse_steer(spec)


def test_steers_checked_against_loaded_saes(sae):
    with pytest.raises(UserError, match="out of range.*0..95"):
        _steering(sae, ["96:add:1"])
    with pytest.raises(UserError, match="none is loaded there.*loaded: resid_post.1"):
        _steering(sae, ["resid_post.0@3:add:1"])
    steering = _steering(sae, ["3:add:500"])
    assert steering.steers[0].hook == HOOK and "500" in steering.warnings[0]  # absurd: warns, still runs


@pytest.mark.parametrize("specs", [["7:add:0"], ["11:bias:0"], ["7:add:0", "11:bias:0", "3:add:0:generated"]])
def test_zero_strength_is_exactly_no_edit(model, sae, specs):
    tokens = _tokens()
    clean = model(tokens)
    with _steering(sae, specs).apply(model, prompt_len=5):
        assert torch.equal(model(tokens), clean)


def test_clamp_at_own_value_is_exactly_no_edit(model, sae):
    tokens = _tokens()[:1, :1]  # one token: its latents are the only ones a clamp could change
    h = _active(model, sae, tokens)[0, 0]
    latent = int(h.argmax())
    clean = model(_tokens()[:1, :1])
    with _steering(sae, [f"{latent}:clamp:{float(h[latent])!r}"]).apply(model):
        assert torch.equal(model(tokens), clean)
    with _steering(sae, [f"{latent}:clamp:{float(h[latent]) + 1}"]).apply(model):
        assert not torch.equal(model(tokens), clean)


def test_edits_move_the_activation_as_specified(model, sae):
    tokens = _tokens()
    x = model.capture(tokens, [HOOK])[HOOK]
    std = x.std(-1, keepdim=True)
    latent, unit = 5, 0.5
    with _steering(sae, [f"{latent}:add:3"], unit=unit).apply(model):
        x_add = model.capture(tokens, [HOOK])[HOOK]
    # add: x + α·W_dec[i], α = strength x unit, scaled back by each token's std (layer_norm SAE)
    torch.testing.assert_close(x_add - x, 3 * unit * sae.W_dec[latent] * std, atol=1e-4, rtol=1e-4)
    with _steering(sae, [f"{latent}:clamp:2"], unit=unit).apply(model):
        x_clamp = model.capture(tokens, [HOOK])[HOOK]
    h = _active(model, sae, tokens)[..., latent:latent + 1]
    torch.testing.assert_close(x_clamp - x, (1.0 - h) * sae.W_dec[latent] * std, atol=1e-4, rtol=1e-4)
    # bias: a large one puts the latent into every token's top k, pushing along its decoder direction
    with _steering(sae, [f"{latent}:bias:40"]).apply(model):
        x_bias = model.capture(tokens, [HOOK])[HOOK]
    along = ((x_bias - x) / std) @ sae.W_dec[latent]  # [B, T]
    assert (along > 30).all()


def test_positions_prompt_and_generated(model, sae):
    tokens = _tokens()
    clean = model.capture(tokens, [HOOK])[HOOK]
    T = 12  # pretend the first 12 slots are the prompt
    for positions, edited in (("prompt", slice(0, T)), ("generated", slice(T - 1, None)), ("last", slice(T - 1, T)),
                              ("last+2", slice(T - 1, T + 2)), ("prompt+1", slice(0, T + 1))):
        with _steering(sae, [f"5:add:3:{positions}"]).apply(model, prompt_len=T):
            x = model.capture(tokens, [HOOK])[HOOK]
        changed = (x - clean).abs().amax(-1).amax(0) > 0  # [T] positions that moved at the hook itself
        want = torch.zeros(tokens.shape[1], dtype=torch.bool)
        want[edited] = True
        assert torch.equal(changed, want)
    with pytest.raises(UserError, match="prompt length"):
        with _steering(sae, ["5:add:3:prompt"]).apply(model):
            pass


@pytest.mark.parametrize("specs", [["5:add:4"], ["9:clamp:3:generated", "5:bias:6:prompt"], ["2:bias:5:generated"],
                                   ["5:add:4:last+2", "9:add:2:prompt+3"]])
def test_cached_and_uncached_steered_generation_agree(model, sae, specs):
    prompts = [_tokens()[0, :7].tolist(), _tokens()[1, :11].tolist()]
    steering = _steering(sae, specs)

    def run(use_cache):
        rows = [[] for _ in prompts]
        with steering.apply(model, prompt_len=11):
            for tok, running in generate_tokens(model, prompts, max_new_tokens=10, stop_ids=set(),
                                                use_cache=use_cache):
                for i in running.nonzero().flatten().tolist():
                    rows[i].append(int(tok[i]))
        return rows

    cached = run(True)
    assert cached == run(False)
    plain = [[int(t) for t in r] for r in zip(*[tok.tolist() for tok, _ in generate_tokens(
        model, prompts, max_new_tokens=10, stop_ids=set())])]
    assert cached != plain  # the steer did something
    assert all(0 <= t < VOCAB for r in cached for t in r)


def test_bos_is_never_steered(model, sae):
    tokens = _tokens()
    tokens[:, 0] = 1  # a BOS id
    clean = model.capture(tokens, [HOOK])[HOOK]
    with _steering(sae, ["5:add:3"]).apply(model, skip_tokens=[1]):
        x = model.capture(tokens, [HOOK])[HOOK]
    moved = (x - clean).abs().amax(-1) > 0  # [B, T]
    assert not moved[:, 0].any() and moved[:, 1:].all()


def _cli(*args):
    from typer.testing import CliRunner

    from llama_sae.cli import app

    return CliRunner().invoke(app, list(args))


def test_cli_steered_generate_records_and_replays(tmp_path):
    from llama_sae import tinyworld

    sae = str(tinyworld.sae_path())
    feats = str(tinyworld.features_path())
    rec = tmp_path / "rec.json"
    out = _cli("generate", "The", "Yesterday,", "--sae", sae, "--features", feats, "--steer", "969:add:6:prompt",
               "-n", "12", "--record", str(rec))
    assert out.exit_code == 0, out.output
    plain = _cli("generate", "The", "Yesterday,", "-n", "12")
    record = json.loads(rec.read_text())
    assert record["steers"][0]["spec"] == "resid_post.5@969:add:6:prompt"
    assert record["steers"][0]["unit"] > 0 and record["saes"]["resid_post.5"]["units"].startswith("features:")
    assert record["outputs"][0] in out.output and record["outputs"][0] not in plain.output  # the steer changed it
    replay = _cli("generate", "--replay", str(rec))
    assert replay.exit_code == 0 and "match the record" in replay.output
    record["outputs"][0] += " (edited)"
    rec.write_text(json.dumps(record))
    assert _cli("generate", "--replay", str(rec)).exit_code == 1
    assert record["device"] == "cpu" and record["dtype"] == "bfloat16"  # the shipped checkpoint's
    sampled = tmp_path / "f32.json"  # sampled in float32: the replay takes the dtype from the record
    out = _cli("generate", "The", "--sae", sae, "--features", feats, "--steer", "969:add:6:prompt", "-n", "12",
               "--dtype", "float32", "--temperature", "1", "--seed", "3", "--record", str(sampled))
    assert out.exit_code == 0 and json.loads(sampled.read_text())["dtype"] == "float32"
    replay = _cli("generate", "--replay", str(sampled))
    assert replay.exit_code == 0 and "match the record" in replay.output


def test_cli_show_features_and_bad_input(tmp_path):
    from llama_sae import tinyworld

    sae = str(tinyworld.sae_path())
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The chef cooked the soup.\n\nYesterday,\n")
    out = _cli("generate", "--prompts-file", str(prompts), "--sae", sae, "--features", str(tinyworld.features_path()),
               "--show-features", "-n", "4")
    assert out.exit_code == 0, out.output
    assert out.output.count("features at resid_post.5") == 2 and "' chef'" in out.output
    for args, message in ((["--steer", "9999:add:1"], "out of range"), (["--steer", "5:add"], "has 2 field"),
                          (["--steer", "resid_post.4@5:add:1"], "none is loaded there")):
        bad = _cli("generate", "The", "--sae", sae, *args)
        assert bad.exit_code != 0 and message in str(bad.exception), (args, bad.output)
    assert _cli("generate", "The", "--steer", "969:add:6", "-n", "4", "--record", str(tmp_path / "d")).exit_code == 0
    assert "need an SAE of this model" in str(_cli("generate", "The", "--model", str(tinyworld.model_path()),
                                                   "--steer", "5:add:1").exception)
    absurd = _cli("generate", "The", "--sae", sae, "--steer", "5:add:80", "-n", "3", "--record", str(tmp_path / "r"))
    assert absurd.exit_code == 0 and "warning" in absurd.output and "80" in absurd.output


def test_bias_enters_topk_and_evicts(model, sae):
    from llama_sae.steer import biased_latents

    x = model.capture(_tokens(), [HOOK])[HOOK].reshape(-1, model.args.dim)
    plain = sae.encode(x)
    latent = int((plain > 0).sum(0).argmin())  # a latent that rarely fires here
    bias = torch.zeros(sae.cfg.d_sae)
    bias[latent] = 50.0
    h = biased_latents(sae, x, bias)
    assert (h[:, latent] > 0).all()  # in every token's top k now
    assert ((h > 0).sum(-1) <= sae.cfg.k).all()  # still k latents: another one was evicted
    assert torch.equal(biased_latents(sae, x, torch.zeros(sae.cfg.d_sae)), plain)  # zero bias: the plain encoding


def test_streamed_steered_generation_equals_batch(model, sae):
    from llama_sae.steer import generate

    class Tok:  # the few tokenizer methods generate() uses, on the random test vocabulary
        bos_id, pad_id, stop_ids = 1, 0, frozenset({2})

        def encode(self, text, bos=True):
            return [1] + [3 + ord(c) % 500 for c in text]

        def decode(self, ids):
            return " ".join(map(str, ids))

        def stream_decoder(self):
            from llama_sae.llama.tokenizer import TextStreamDecoder

            return TextStreamDecoder(self.decode)

    steering = _steering(sae, ["5:add:3:generated", "9:clamp:2:prompt"])
    kw = dict(max_new_tokens=8, stop_ids={2})
    batch = generate(model, Tok(), ["abc"], steering, **kw)[0].tokens
    streamed = [c.token for c in generate(model, Tok(), ["abc"], steering, stream=True, **kw) if c.token >= 0]
    assert streamed == batch and batch != generate(model, Tok(), ["abc"], None, **kw)[0].tokens
    tokens, stream = _tokens(), generate(model, Tok(), ["abc"], steering, stream=True, **kw)
    clean, first = model(tokens), next(stream)
    assert torch.equal(model(tokens), clean) and not model.edits  # unsteered between chunks
    assert [first.token] + [c.token for c in stream if c.token >= 0] == batch


def test_steers_built_in_python_are_checked_like_parsed_ones(sae):
    units = {HOOK: torch.ones(sae.cfg.d_sae)}
    for steer, message in [(Steer(5, "Clamp", 0.0), "kind 'Clamp' is not one of clamp, add, bias"),
                           (Steer(5, "add", 1.0, "Last"), "positions 'Last' is not one of"),
                           (Steer("5", "add", 1.0), "latent '5' is not a non-negative integer"),
                           (Steer(5, "add", float("nan")), "strength nan is not a finite number")]:
        with pytest.raises(UserError, match=message):
            Steering({HOOK: sae}, [steer], units)


def test_spec_keeps_the_whole_strength():
    for strength in (4.0, -2.5, 4.1234567, 0.1 + 0.2, 1e-7):
        assert parse_steer(Steer(5, "add", strength).spec).strength == strength
    assert Steer(5, "add", 4.0).spec == "5:add:4"


def _window(shape, positions, prompt_len):
    """[B, T] bool: the tokens a steer on ``positions`` edits (no skipped tokens)."""
    from llama_sae.steer import positions_window

    lo, hi = positions_window(positions, prompt_len)
    pos = torch.arange(shape[1])
    keep = (pos >= lo) if hi is None else (pos >= lo) & (pos < hi)
    return keep.expand(shape)


def _reference(model, sae, tokens, steering, prompt_len):
    """The hook activation under ``steering`` computed the old way: every token encoded, the edits masked
    afterwards (a bias through biased_latents over all tokens), the splice over all tokens."""
    from llama_sae.splice import spliced
    from llama_sae.steer import biased_latents

    x = model.capture(tokens, [HOOK])[HOOK]
    bias = torch.zeros(sae.cfg.d_sae)
    for s in steering.steers:
        if s.kind == "bias":
            bias[s.latent] += steering.value(s)

    def edit(h):
        for s in steering.steers:
            mask = _window(h.shape[:2], s.positions, prompt_len)
            if s.kind == "bias":
                h[mask] = biased_latents(sae, x, bias).view(h.shape)[mask]
        for s in steering.steers:
            mask = _window(h.shape[:2], s.positions, prompt_len)
            if s.kind == "clamp":
                h[mask, s.latent] = steering.value(s)
            elif s.kind == "add":
                h[mask, s.latent] += steering.value(s)
        return h

    with spliced(model, sae, edit=edit):
        return x, model.capture(tokens, [HOOK])[HOOK]


@pytest.mark.parametrize("specs", [["5:clamp:2:last", "9:add:3:last"], ["9:clamp:0:prompt+2"],
                                   ["7:bias:20:prompt", "5:clamp:1:last"], ["3:bias:15:last+1"],
                                   ["5:add:3:prompt", "9:add:-2:last+1", "5:add:1:last"], ["5:add:2"]])
def test_steering_changes_the_steered_tokens_only_as_before(model, sae, specs):
    tokens, T = _tokens(), 12
    steering = _steering(sae, specs, unit=0.5)
    x, want = _reference(model, sae, tokens, steering, T)
    with steering.apply(model, prompt_len=T):
        got = model.capture(tokens, [HOOK])[HOOK]
    steered = torch.zeros(tokens.shape, dtype=torch.bool)
    for s in steering.steers:
        steered |= _window(tokens.shape, s.positions, T)
    assert torch.equal(got[~steered], x[~steered])  # the other tokens pass through bit for bit
    assert not torch.equal(got[steered], x[steered])
    # the steered tokens: the encoder GEMM over fewer rows may round differently, and add steers skip the encode
    # (v·W_dec where the old path decoded (h + v) - h): 1e-5 of each token's change
    assert (((got - want)[steered]).norm(dim=-1) <= 1e-5 * (want - x)[steered].norm(dim=-1)).all()


def _count_encodes(monkeypatch, sae):
    """Rows encoded per call (the plain encode and a bias's re-encode), recorded as they happen."""
    import llama_sae.splice as splice_mod

    calls = []
    select, encode_select = sae.select, splice_mod.encode_select
    monkeypatch.setattr(sae, "select", lambda xc, *a: calls.append(len(xc)) or select(xc, *a))
    monkeypatch.setattr(splice_mod, "encode_select",
                        lambda xc, *a, **kw: calls.append(("bias", len(xc))) or encode_select(xc, *a, **kw))
    return calls


@pytest.mark.parametrize("specs, encodes", [
    (["5:clamp:2:last"], [2]),  # the prefill's last token of each row, then no decoding step runs the SAE
    (["5:clamp:2:last+2", "9:add:1:last"], [2, 2, 2]),
    (["2:bias:5:last"], [2, ("bias", 2)]),
    (["5:add:3:last", "9:add:-1"], []),  # add steers alone never encode
])
def test_steering_encodes_only_steered_tokens(model, sae, monkeypatch, specs, encodes):
    prompts = [_tokens()[0, :7].tolist(), _tokens()[1, :11].tolist()]
    steering = _steering(sae, specs)
    calls = _count_encodes(monkeypatch, sae)
    with steering.apply(model, prompt_len=11):
        out = [tok.tolist() for tok, _ in generate_tokens(model, prompts, max_new_tokens=6, stop_ids=set())]
    assert calls == encodes
    assert out != [tok.tolist() for tok, _ in generate_tokens(model, prompts, max_new_tokens=6, stop_ids=set())]


def test_steering_without_error_term_reconstructs_every_token(model, sae):
    from llama_sae.splice import spliced

    tokens = _tokens()
    steering = _steering(sae, ["5:clamp:2:last", "9:add:3:last"], error_term=False)
    mask = _window(tokens.shape, "last", 12)

    def edit(h):
        h[mask, 5] = 2.0
        h[mask, 9] += 3.0
        return h

    with spliced(model, sae, error_term=False, edit=edit):
        want = model(tokens)
    with steering.apply(model, prompt_len=12):
        assert torch.equal(model(tokens), want)


def test_quick_unit_estimate_matches_the_features_artifact(one_thread):
    """Without --features, units come from estimate_units: it must compute the artifact's typical_max statistic,
    so that "+4" is the same push with or without the artifact (the old estimate read about 2x low)."""
    from llama_sae import tinyworld
    from llama_sae.features import load_features
    from llama_sae.llama import load_tokenizer
    from llama_sae.sae import load
    from llama_sae.steer import estimate_units

    path = tinyworld.model_path()
    model, tok, sae = load_model(path), load_tokenizer(path), load(tinyworld.sae_path())
    artifact = torch.as_tensor(load_features(tinyworld.features_path()).typical_max)
    estimate = estimate_units(model, tok, sae)  # a different sample of 2,000 held-out sentences
    live = artifact > 0
    ratio = estimate[live] / artifact[live]
    assert 0.95 < float(ratio.median()) < 1.05  # the same statistic: no systematic scale between the two
    assert float(((ratio - 1).abs() < 0.25).float().mean()) > 0.9  # and close latent by latent
    # the running top 8 (one batch of sentences at a time) equals the top 8 of every sentence's row at once
    from llama_sae.steer import fill_dead_units
    from llama_sae.tinyworld.recovery import sentence_activations

    texts = [r.text for r in tinyworld.sentences(300, seed=11, split="heldout")]
    best = sentence_activations(model, tok, sae, texts)[0].topk(8, dim=0).values
    dense = fill_dead_units(best.sum(0) / (best > 0).sum(0).clamp_min(1))
    assert torch.equal(estimate_units(model, tok, sae, n_sentences=300), dense)


def test_replay_of_a_record_that_is_not_ours_is_one_line():
    from llama_sae.steer import replay

    with pytest.raises(UserError, match="the record lacks saes, steers"):
        replay({"model": "x", "prompts": [], "outputs": [], "chat": False, "sampling": {}, "error_term": True})


def test_clamp_and_add_decode_only_the_steered_latents_exactly(model, sae, monkeypatch):
    """Clamp and add steers never build dense [tokens, d_sae] latents, and give the splice's numbers bit for bit
    (the same edit on dense latents of the same steered tokens)."""
    import llama_sae.splice as splice_mod
    from llama_sae.splice import spliced

    tokens, T = _tokens(), 12
    steering = _steering(sae, ["5:clamp:2:last", "9:add:3:prompt+1", "5:add:1:last", "7:clamp:0"], unit=0.5)
    union = torch.zeros(tokens.shape, dtype=torch.bool)
    for s in steering.steers:
        union |= _window(tokens.shape, s.positions, T)

    def edit(h):  # h [m, d_sae]: the steered tokens' latents, in x[union] order
        for s in steering.steers:
            mask = _window(tokens.shape, s.positions, T)[union]
            if s.kind == "clamp":
                h[mask, s.latent] = steering.value(s)
            else:
                h[mask, s.latent] += steering.value(s)
        return h

    with spliced(model, sae, edit=edit, rows=lambda x: union):
        want = model.capture(tokens, [HOOK])[HOOK]
    monkeypatch.setattr(splice_mod, "reconstruct", lambda *a, **kw: pytest.fail("dense latents built"))
    with steering.apply(model, prompt_len=T):
        got = model.capture(tokens, [HOOK])[HOOK]
    assert torch.equal(got, want)


def test_an_sae_keeps_its_features_artifact_in_its_directory(tmp_path):
    """SAE_DIR/features is used when no --features is given (the shipped SAE keeps its own there), but only if
    it was built from those weights: a retrained SAE in the same place falls back to the estimate."""
    import shutil

    from llama_sae import tinyworld
    from llama_sae.llama import load_model, load_tokenizer
    from llama_sae.sae import load
    from llama_sae.steer import build_steering, load_saes, match_features

    rec = tmp_path / "rec.json"
    out = _cli("generate", "The", "--sae", str(tinyworld.sae_path()), "--steer", "969:add:4", "-n", "3",
               "--record", str(rec))
    assert out.exit_code == 0 and "no features artifact" not in out.output
    assert json.loads(rec.read_text())["saes"]["resid_post.5"]["units"] == f"features:{tinyworld.features_path()}"
    own = tmp_path / "sae"
    shutil.copytree(tinyworld.sae_path(), own)
    model, tok = load_model(tinyworld.model_path()), load_tokenizer(tinyworld.model_path())
    saes, sources = load_saes(model, [own])
    assert match_features([], saes) == {}  # no sources, no look in the directory
    by_file = load_saes(model, [own / "cfg.json"])  # a file of the SAE names its directory, there too
    assert set(match_features([], *by_file)) == {"resid_post.5"}
    steering = build_steering(model, tok, saes, parse_steers(["969:add:4"]), sources=sources)
    assert steering.sources["resid_post.5"]["units"] == f"features:{own / 'features'}"
    changed = load(own)
    changed.b_enc.data[0] += 1.0
    changed.save(own)  # other weights, the old artifact beside them
    saes, sources = load_saes(model, [own])
    notes = []
    assert match_features([], saes, sources, notes) == {}
    assert notes == [f"{own / 'features'} is not used for resid_post.5: it was built from other weights than the "
                     "SAE's (rebuild it with llama-sae features)"]
    out = _cli("generate", "The", "--sae", str(own), "--steer", "969:add:4", "-n", "1")
    assert out.exit_code == 0 and f"note: {own / 'features'} is not used" in " ".join(out.output.split())
    steering = build_steering(model, tok, saes, parse_steers(["969:add:4"]), sources=sources, estimate_sentences=50)
    assert steering.sources["resid_post.5"]["units"].startswith("estimate:")


def test_a_record_takes_the_generated_texts():
    from llama_sae.steer import record

    class Completion:  # what steer.generate returns: the text is one of its fields
        text = " a word"

    with pytest.raises(TypeError, match=r"not Completion: pass \[o.text for o in outputs\]"):
        record(None, "model", ["The"], [Completion()], {"max_new_tokens": 2})
    rec = record(None, "model", ["The"], [Completion.text], {"max_new_tokens": 2})
    assert rec["outputs"] == [" a word"] and json.loads(json.dumps(rec)) == rec
