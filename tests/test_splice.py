"""Splicing SAEs into the model: exact with the error term, reconstruction-only without, edits in between."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB

from llama_sae.errors import UserError
from llama_sae.llama import load_model
from llama_sae.llama.generate import generate_tokens
from llama_sae.sae.model import SAE, SAEConfig
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
    with pytest.raises(UserError, match="hook_name is empty"):
        with spliced(model, _sae(model, None)):
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
