"""Splicing SAEs into the model: exact with the error term, reconstruction-only without, edits in between."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import VOCAB

from llama_sae.errors import UserError
from llama_sae.llama import load_model
from llama_sae.llama.generate import generate_tokens
from llama_sae.sae.model import SAE, SAEConfig, normalize
from llama_sae.splice import SplicedModel, spliced


def _sae(model, hook, d_sae=96, k=8, norm="layer_norm", seed=0):
    cfg = SAEConfig(d_in=model.args.dim, d_sae=d_sae, k=k, normalize_activations=norm, hook_name=hook)
    sae = SAE(cfg)
    g = torch.Generator().manual_seed(seed)
    sae.init_(torch.randn(256, cfg.d_in, generator=g), generator=g)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1, generator=g)
    return sae


@pytest.fixture(scope="module")
def model(hf_checkpoints):
    return load_model(hf_checkpoints["gqa-tied-f32"][1])


def _tokens(seed=2):
    return torch.randint(0, VOCAB, (3, 21), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("norm", ["layer_norm", "none"])
def test_unedited_splice_reproduces_logits_exactly(model, norm):
    tokens = _tokens()
    clean = model(tokens)
    with spliced(model, _sae(model, "resid_post.1", norm=norm)):
        assert torch.equal(model(tokens), clean)
    assert torch.equal(model(tokens), clean)  # and nothing stays behind


def test_reconstruction_only_runs_on_x_hat(model):
    sae = _sae(model, "resid_post.1")
    tokens = _tokens()
    with spliced(model, sae, error_term=False):
        got = model(tokens)
        seen = model.capture(tokens, ["resid_post.1"])["resid_post.1"]
    x = model.capture(tokens, ["resid_post.1"])["resid_post.1"]
    torch.testing.assert_close(seen, sae(x), atol=1e-6, rtol=0)
    assert not torch.allclose(got, model(tokens), atol=1e-3)


def test_edit_sees_latents_and_changes_output(model):
    sae = _sae(model, "resid_post.0")
    tokens = _tokens()
    seen = {}

    def edit(h):
        seen["h"] = h.clone()
        return h

    with spliced(model, sae, edit=edit):
        same = model(tokens)
    assert seen["h"].shape == (3, 21, sae.cfg.d_sae)
    assert ((seen["h"] > 0).sum(-1) <= sae.cfg.k).all()
    torch.testing.assert_close(same, model(tokens), atol=1e-5, rtol=0)  # identity edit: only rounding
    latent = int(seen["h"].flatten(0, 1).sum(0).argmax())

    def boost(h):
        h = h.clone()
        h[..., latent] += 5.0
        return h

    with spliced(model, sae, edit=boost):
        boosted = model(tokens)
        x_edit = model.capture(tokens, ["resid_post.0"])["resid_post.0"]
    x = model.capture(tokens, ["resid_post.0"])["resid_post.0"]
    # with layer_norm the decoder direction is scaled back by each token's std
    std = x.std(-1, keepdim=True)
    torch.testing.assert_close(x_edit - x, 5.0 * sae.W_dec[latent] * std, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(boosted, model(tokens), atol=1e-3)


def test_several_saes_and_cached_generation(model):
    saes = [_sae(model, "resid_post.0"), _sae(model, "attn_in.2", seed=1)]
    prompts = [_tokens()[0, :7].tolist(), _tokens()[1, :11].tolist()]

    def run(use_cache):
        rows = [[] for _ in prompts]
        for tok, running in generate_tokens(model, prompts, max_new_tokens=12, stop_ids=set(), use_cache=use_cache):
            for i in running.nonzero().flatten().tolist():
                rows[i].append(int(tok[i]))
        return rows

    with spliced(model, saes, error_term=False):
        cached, uncached = run(True), run(False)
    assert cached == uncached
    assert cached != run(True)  # the reconstruction-only model writes something else


def test_splice_bad_inputs(model):
    with pytest.raises(UserError, match="64 wide"):
        with spliced(model, SAE(SAEConfig(d_in=32, d_sae=64, k=4, hook_name="resid_post.0"))):
            pass
    with pytest.raises(UserError, match="out of range"):
        with spliced(model, _sae(model, "resid_post.9")):
            pass
    with pytest.raises(UserError, match="does not name a hook point of ours .*: pass --hook KIND.LAYER"):
        with spliced(model, _sae(model, None)):
            pass
    elsewhere = SAE(SAEConfig(d_in=model.args.dim, d_sae=64, k=4, hook_name="resid_post.0"), device="meta")
    with pytest.raises(UserError, match="the SAE is on meta but the model on cpu: load it with"):
        with spliced(model, elsewhere):  # (a CUDA SAE next to a CPU model fails the same way)
            pass


def test_spliced_model_wrapper_behaves_like_the_model(model):
    saes = [_sae(model, "resid_post.0"), _sae(model, "mlp_out.1", seed=1)]
    tokens = _tokens()
    clean = model(tokens)
    sm = SplicedModel(model, saes)
    assert torch.equal(sm(tokens), clean)  # exact with the error term
    assert sm.args is model.args and sm.device == model.device and "resid_post.0" in repr(sm)
    sm.error_term = False
    with spliced(model, saes, error_term=False):
        want = model(tokens)
        want_acts = model.capture(tokens, ["resid_post.1"])["resid_post.1"]
    assert torch.equal(sm(tokens), want)
    assert torch.equal(sm.capture(tokens, ["resid_post.1"])["resid_post.1"], want_acts)
    assert torch.equal(model(tokens), clean)  # the model itself stays unspliced
    sm.error_term, sm.edit = True, {"resid_post.0": lambda h: h * 0}
    with spliced(model, saes, edit={"resid_post.0": lambda h: h * 0}):
        want = model(tokens)
    assert torch.equal(sm(tokens), want) and not torch.equal(want, clean)
    prompts = [_tokens()[0, :7].tolist()]
    rows = [[int(t[0]) for t, _ in generate_tokens(sm, prompts, max_new_tokens=8, stop_ids=set(), use_cache=c)]
            for c in (True, False)]
    assert rows[0] == rows[1]  # generation through the wrapper, cached and uncached agree
    with pytest.raises(UserError, match="two SAEs read resid_post.0"):
        SplicedModel(model, [saes[0], saes[0]])
    sm = SplicedModel(model, saes, error_term=False)
    assert torch.equal(sm.forward(tokens), sm(tokens)) and not torch.equal(sm.forward(tokens), clean)
    twin = copy.deepcopy(sm)  # copies (and pickles) like any object: no recursion through __getattr__
    assert twin.model is not model and torch.equal(twin(tokens), sm(tokens))
    with pytest.raises(UserError, match="edit names resid_post.3, where no SAE is spliced: the SAEs read "
                                        "mlp_out.1, resid_post.0"):
        SplicedModel(model, saes, edit={"resid_post.3": lambda h: h * 0})  # a typo'd hook is not "no change"
    with pytest.raises(UserError, match="rows names mlp_out.2"), spliced(model, saes, rows={"mlp_out.2": None}):
        pass
    with pytest.raises(TypeError, match="the latent edit returned NoneType: it must return the latents"):
        with spliced(model, saes[0], edit=lambda h: [h.mul_(2)] and None):
            model(tokens)
    for wrong in (lambda h: h.transpose(0, 1), lambda h: h.flatten(0, 1), lambda h: h[..., :-1]):  # a transposed
        with pytest.raises(ValueError, match="the latent edit returned shape .* for latents of shape"):  # [T, B,
            with spliced(model, saes[0], edit=wrong):  # n] landed on the wrong tokens without a word
                model(tokens)
    assert torch.equal(model(tokens), clean)  # and the model is left unspliced after the error


def test_bf16_encoder_option_threads_through_and_stays_close(model):
    sae = _sae(model, "resid_post.1", d_sae=256, k=8)
    tokens = _tokens()
    clean = model(tokens)
    with spliced(model, sae, compute_dtype=torch.bfloat16):
        assert torch.equal(model(tokens), clean)  # unedited with the error term: still exact
    with spliced(model, sae, error_term=False):
        want = model.capture(tokens, ["resid_post.1"])["resid_post.1"]
    with spliced(model, sae, error_term=False, compute_dtype=torch.bfloat16):
        got = model.capture(tokens, ["resid_post.1"])["resid_post.1"]
        logits = model(tokens)
    rows_same = ((got - want).norm(dim=-1) <= 1e-5 * want.norm(dim=-1)).float().mean()
    assert rows_same > 0.7  # most tokens pick the same latents, whose values are recomputed in float32
    assert (got - want).norm() < 0.1 * want.norm()  # the rest swap a near-tied latent
    assert torch.equal(SplicedModel(model, sae, error_term=False, compute_dtype=torch.bfloat16)(tokens), logits)


def _near(got, want, rel=1e-5):
    """Per token: |got - want| <= rel·|want| (rows of the last dim)."""
    return bool(((got - want).norm(dim=-1) <= rel * want.norm(dim=-1)).all())


@pytest.mark.parametrize("norm", ["layer_norm", "none"])
def test_rows_run_the_sae_on_the_chosen_tokens_only(model, norm):
    sae = _sae(model, "resid_post.1", norm=norm)
    tokens, hook = _tokens(), "resid_post.1"
    x = model.capture(tokens, [hook])[hook]
    latent, rare = 5, int((sae.encode(x.flatten(0, 1)) > 0).sum(0).argmin())
    bias = torch.zeros(sae.cfg.d_sae)
    bias[rare] = 30.0

    def boost(h):  # in place: an add and a clamp
        h[..., latent] += 4.0
        h[..., 7] = 0.5
        return h

    def pre_bias(x):  # every token; rows cut it down to the chosen ones
        return bias, torch.ones(x.shape[:-1], dtype=torch.bool)

    mask = torch.zeros(tokens.shape, dtype=torch.bool)
    mask[0, 3] = mask[2, -1] = True
    mask[1, 10:14] = True
    with spliced(model, sae, edit=boost, pre_bias=pre_bias):
        full = model.capture(tokens, [hook])[hook]
    shapes = []

    def seen(h):
        shapes.append(tuple(h.shape))
        return boost(h)

    with spliced(model, sae, edit=seen, pre_bias=pre_bias, rows=lambda x: mask):
        got = model.capture(tokens, [hook])[hook]
    assert shapes == [(int(mask.sum()), sae.cfg.d_sae)]  # the edit saw the chosen tokens' latents only
    assert torch.equal(got[~mask], x[~mask])  # every other token passes through bit for bit
    assert not torch.equal(got[mask], x[mask])
    # the chosen tokens as in the splice over all tokens; the encoder GEMM over fewer rows may round differently
    assert _near(got[mask], full[mask])
    with spliced(model, sae, edit=boost, rows=lambda x: None):  # None: all tokens, the plain path exactly
        none_rows = model.capture(tokens, [hook])[hook]
    with spliced(model, sae, edit=boost):
        assert torch.equal(none_rows, model.capture(tokens, [hook])[hook])
    with spliced(model, sae, edit=boost, rows=lambda x: torch.ones(x.shape[:-1], dtype=torch.bool)):
        assert _near(model.capture(tokens, [hook])[hook], none_rows)  # every token chosen
    # error_term=False ignores rows: every token is reconstructed
    with spliced(model, sae, error_term=False, edit=boost):
        want = model(tokens)
    assert torch.equal(SplicedModel(model, sae, error_term=False, edit=boost, rows=lambda x: mask)(tokens), want)


@pytest.mark.parametrize("error_term", [True, False])
def test_pre_bias_without_an_edit_on_batched_input(model, error_term):
    """A bias alone (no edit) on [B, T, d] input: a zero bias changes nothing, and a large one on a latent
    makes it fire where a dense float64 re-encode says it does."""
    hook = "resid_post.1"
    sae, tokens = _sae(model, hook), _tokens()
    x = model.capture(tokens, [hook])[hook]
    zero, big = torch.zeros(sae.cfg.d_sae), torch.zeros(sae.cfg.d_sae)
    big[3] = 50.0
    every = lambda b: (lambda h: (b, torch.ones(h.shape[:-1], dtype=torch.bool)))  # noqa: E731
    with spliced(model, sae, error_term=error_term):
        want = model.capture(tokens, [hook])[hook]
    with spliced(model, sae, error_term=error_term, pre_bias=every(zero)):
        assert torch.equal(model.capture(tokens, [hook])[hook], want)
    with spliced(model, sae, error_term=error_term, pre_bias=every(big)):
        got = model.capture(tokens, [hook])[hook]
    x_norm, mu, std = normalize(x.flatten(0, 1).double(), "layer_norm")
    pre = (x_norm - sae.b_dec.double()) @ sae.W_enc.double().T + sae.b_enc.double() + big.double()
    top = pre.topk(sae.cfg.k, dim=1)
    recon = torch.zeros_like(pre).scatter_(1, top.indices, top.values.relu()) @ sae.W_dec.double() + sae.b_dec
    recon = recon * std + mu  # the reconstruction of the biased latents
    if error_term:  # plus the error of the unbiased input
        recon = recon + x.flatten(0, 1).double() - sae(x).flatten(0, 1).double()
    assert (top.indices == 3).any(1).all()
    torch.testing.assert_close(got.flatten(0, 1).double(), recon, atol=1e-4, rtol=1e-4)


def test_rows_with_no_token_run_no_sae(model, monkeypatch):
    sae = _sae(model, "resid_post.1")
    tokens = _tokens()
    clean = model(tokens)
    calls = []
    monkeypatch.setattr(sae, "select", lambda *a, **kw: calls.append(1))
    with spliced(model, sae, edit=lambda h: h * 2, rows=lambda x: torch.zeros(x.shape[:-1], dtype=torch.bool)):
        assert torch.equal(model(tokens), clean)
    assert calls == []
    with pytest.raises(ValueError, match="mask of shape"):
        with spliced(model, sae, edit=lambda h: h, rows=lambda x: torch.ones(3, dtype=torch.bool)):
            model(tokens)


@pytest.mark.parametrize("norm", ["layer_norm", "none"])
def test_reconstruct_delta_without_x_hat_and_edits_own_tensors(model, norm):
    from llama_sae.sae.model import normalize
    from llama_sae.splice import reconstruct

    sae = _sae(model, "resid_post.1", norm=norm)
    x = model.capture(_tokens(), ["resid_post.1"])["resid_post.1"].flatten(0, 1)

    def boost(h):
        h[:, 3] += 2.0
        h[::2, 9] = 1.5
        return h

    clean, delta = reconstruct(sae, x, boost)
    skipped, same = reconstruct(sae, x, boost, need_clean=False)
    assert skipped is None and torch.equal(same, delta)  # the error-term path skips x̂ and loses nothing
    torch.testing.assert_close(clean, sae(x), atol=1e-5, rtol=1e-5)
    # the old computation: (edited - unedited) dense latents, decoded, denormalized by the token's std
    h = sae.encode(x)
    std = normalize(x, norm)[2]
    want = (boost(h.clone()) - h) @ sae.W_dec
    torch.testing.assert_close(delta, want if std is None else want * std, atol=1e-5, rtol=1e-5)
    kept = boost(h.clone())  # an edit that returns a tensor of its own: the splice must not change it
    copy = kept.clone()
    _, foreign = reconstruct(sae, x, lambda _: kept, need_clean=False)
    assert torch.equal(kept, copy) and torch.equal(foreign, delta)
    assert reconstruct(sae, x, lambda h: h)[1] is None  # an edit that changes nothing: no change at all
    assert reconstruct(sae, x, lambda h: h.clone())[1] is None


def test_recovery_and_unit_estimates_refuse_an_sae_that_does_not_fit(model):
    from llama_sae.steer import estimate_units
    from llama_sae.tinyworld.recovery import iter_sentence_activations

    sae = SAE(SAEConfig(d_in=model.args.dim + 1, d_sae=16, k=2, hook_name="resid_post.0"))
    with pytest.raises(UserError, match="belongs to another model"):
        next(iter_sentence_activations(model, None, sae, ["x"]))
    with pytest.raises(UserError, match="belongs to another model"):
        estimate_units(model, None, sae, n_sentences=2)
    named = SAE(sae.cfg.model_copy(update={"model_name": "meta-llama/Llama-3.2-3B"}))
    with pytest.raises(UserError, match=r"another model \(its files name meta-llama/Llama-3.2-3B\)$"):
        estimate_units(model, None, named, n_sentences=2)
    from llama_sae import tinyworld

    on_disk = SAE(sae.cfg.model_copy(update={"model_name": str(tinyworld.model_path())}))
    with pytest.raises(UserError, match=r"another model \(its files name .*model: load that checkpoint\)$"):
        estimate_units(model, None, on_disk, n_sentences=2)
