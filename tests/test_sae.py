"""The TopK SAE: sparse kernels against a float64 dense reference (forward, every gradient, aux-k), the decoder
constraints, the inference API, and the SAELens v6 files (golden bytes, round trip, SAELens itself if present)."""

from __future__ import annotations

import copy
import hashlib
import json

import numpy as np
import pytest
import torch

from llama_sae.errors import UserError
from llama_sae.sae import SAE, SAEConfig, load
from llama_sae.sae.formats import load_sparsity, save
from llama_sae.sae.model import LN_EPS, LatentRows, gather_dot, normalize, scatter_rows, stable_order

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread for small kernels


def make_sae(d=24, n=96, k=5, norm="layer_norm", seed=0, dtype=torch.float64) -> tuple[SAE, torch.Tensor]:
    """A randomly initialized SAE (non-zero b_enc, non-unit encoder) and a batch [40, d] in its input space."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(40, d, generator=g, dtype=dtype) * 3 + torch.randn(d, generator=g, dtype=dtype)
    sae = SAE(SAEConfig(d_in=d, d_sae=n, k=k, normalize_activations=norm)).to(dtype)
    sae.init_(normalize(x, norm)[0].to(dtype), generator=g)
    with torch.no_grad():
        sae.W_enc.mul_(4)
        sae.b_enc.copy_(0.3 * torch.randn(n, generator=g, dtype=dtype))
    return sae, x


def grads_of(sae: SAE, x_norm: torch.Tensor, dead, k_aux: int, dense: bool):
    """Outputs, and the gradients of a loss that uses every output (recon and aux-k) in a non-trivial way:
    by autograd through the dense reference, or by the sparse path's own backward."""
    w = torch.linspace(0.5, 1.5, x_norm.shape[1], dtype=x_norm.dtype)
    sae.zero_grad(set_to_none=True)
    if dense:
        out = sae.forward_train_dense(x_norm, dead, k_aux)
        loss = ((out.recon - x_norm).pow(2) * w).sum()
        if out.auxk_recon is not None:
            loss = loss + 0.7 * (out.auxk_recon - (x_norm - out.recon).detach()).pow(2).sum()
        loss.backward()
    else:
        out = sae.forward_train(x_norm, dead, k_aux)
        g_auxk = None if out.auxk_recon is None else 1.4 * (out.auxk_recon - (x_norm - out.recon))
        sae.backward_train_(out, 2 * w * (out.recon - x_norm), g_auxk)
    return out, {name: p.grad.clone() for name, p in sae.named_parameters()}


@pytest.mark.parametrize("dead, k_aux", [(None, 4), ([0, 3, 7, 11, 50, 95], 4), (list(range(0, 96, 2)), 4),
                                         (list(range(0, 96, 2)), 2)])  # aux-k dense, dense, sparse (48 > 16 x 2)
def test_sparse_path_equals_dense_reference_in_float64(dead, k_aux):
    sae, x = make_sae()
    x_norm = normalize(x, "layer_norm")[0].double()
    dead = None if dead is None else torch.tensor(dead)
    fast, g_fast = grads_of(sae, x_norm, dead, k_aux, dense=False)
    ref, g_ref = grads_of(sae, x_norm, dead, k_aux, dense=True)
    assert (fast.aux_dense is None) == (dead is None or len(dead) > 16 * k_aux)
    assert torch.equal(fast.top_indices.sort(1).values, ref.top_indices.sort(1).values)
    torch.testing.assert_close(fast.recon, ref.recon.detach(), rtol=1e-12, atol=1e-12)
    if dead is None:
        assert fast.auxk_recon is None and ref.auxk_recon is None
    else:
        torch.testing.assert_close(fast.auxk_recon, ref.auxk_recon.detach(), rtol=1e-12, atol=1e-12)
    for name in g_ref:  # all four parameters, aux-k included (it reaches the encoder too, as in OpenAI's code)
        torch.testing.assert_close(g_fast[name], g_ref[name], rtol=1e-10, atol=1e-10, msg=name)


def test_float32_sparse_path_is_close_to_float64_reference():
    sae64, x = make_sae()
    x_norm = normalize(x, "layer_norm")[0]
    dead = torch.tensor([1, 2, 3, 40])
    ref, g_ref = grads_of(sae64, x_norm.double(), dead, 3, dense=True)
    sae32 = SAE(sae64.cfg)
    sae32.load_state_dict({k: v.float() for k, v in sae64.state_dict().items()})
    fast, g_fast = grads_of(sae32, x_norm, dead, 3, dense=False)
    torch.testing.assert_close(fast.recon.double(), ref.recon.detach(), rtol=1e-5, atol=1e-5)
    for name in g_ref:  # float32 accumulation over 40 tokens: relative 1e-4 of the gradient's scale
        scale = g_ref[name].abs().max().item()
        torch.testing.assert_close(g_fast[name].double(), g_ref[name], rtol=1e-4, atol=1e-4 * scale, msg=name)


def test_bf16_encoder_selects_nearly_the_same_latents():
    sae, x = make_sae(d=64, n=512, k=16, dtype=torch.float32)
    x_norm = normalize(x, "layer_norm")[0]
    exact = sae.forward_train(x_norm)
    fast = sae.forward_train(x_norm, compute_dtype=torch.bfloat16)
    same = (exact.top_indices.sort(1).values == fast.top_indices.sort(1).values).float().mean()
    assert same > 0.9  # only near-ties at the k-th value may swap ...
    assert fast.top_acts.sum() > (1 - 1e-3) * exact.top_acts.sum()  # ... so the chosen sum is nearly the best
    pre = (x_norm - sae.b_dec) @ sae.W_enc.T + sae.b_enc  # float32 reference pre-activations
    torch.testing.assert_close(fast.top_acts, pre.gather(1, fast.top_indices).relu(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n, k", [(512, 16), (1000, 7), (96, 5), (64, 5)])  # blocks of 8, 8, 4; none (too narrow)
def test_bf16_encoder_on_a_cpu_selects_the_exact_top_k(n, k, monkeypatch):
    """The bf16 GEMM only proposes candidates; their exact values decide, so near-ties at the k-th place
    go the float64 reference's way (a top k of the bf16 values themselves swaps latents in many rows)."""
    from llama_sae.sae import model

    sae, _ = make_sae(d=64, n=n, k=k, dtype=torch.float32)
    x = torch.randn(3000, 64, generator=torch.Generator().manual_seed(n)) * 3
    xc = normalize(x, "layer_norm")[0] - sae.b_dec
    vals, idx = sae.select(xc, torch.bfloat16)
    ref = xc.double() @ sae.W_enc.double().T + sae.b_enc.double()  # [N, n] float64 reference
    top = ref.topk(k + 1, dim=1).values
    clear = (top[:, k - 1] - top[:, k]) > 1e-5 * top[:, k - 1].abs()  # not tied within float32 rounding
    want = torch.zeros_like(ref, dtype=torch.bool).scatter_(1, ref.topk(k, dim=1).indices, True)
    got = torch.zeros_like(want).scatter_(1, idx, True)
    assert (got == want).all(1)[clear].all()
    torch.testing.assert_close(vals.double(), ref.gather(1, idx).relu(), rtol=1e-5, atol=1e-5)
    W16 = sae.encoder_matrix(torch.bfloat16)  # what a top k of the bf16 values would have kept
    pre16 = torch.cat([xc, torch.ones(len(xc), 1)], 1).bfloat16() @ W16.T
    old = torch.zeros_like(want).scatter_(1, pre16.float().topk(k, dim=1).indices, True)
    assert (old != want).any(1).float().mean() > 0.01  # 2-14% of rows here
    monkeypatch.setattr(model, "CANDIDATE_BLOCK", 7 * n)  # chunks of 16 tokens select the same
    vals_b, idx_b = sae.select(xc, torch.bfloat16)
    assert torch.equal(idx_b, idx) and torch.equal(vals_b, vals)


def test_bf16_selection_when_the_kth_pre_activation_is_near_zero():
    """bf16's error is absolute (~2^-9 of |x|·|w| summed over d): a margin relative to the k-th value alone left
    no room where that value is near 0 (12 of 4,000 rows here kept a latent 1e-3 below the one they missed)."""
    g = torch.Generator().manual_seed(0)
    d, n, k = 2048, 100, 10  # no strided blocks: the margin is the only slack
    sae = SAE(SAEConfig(d_in=d, d_sae=n, k=k, normalize_activations="none"))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(n, d, generator=g) / d**0.5)
        sae.b_enc.fill_(-1.0)  # most pre-activations negative: the k-th lies near 0
    xc = torch.randn(4000, d, generator=g)
    _, idx = sae.select(xc, torch.bfloat16)
    ref = xc.double() @ sae.W_enc.double().T + sae.b_enc.double()
    want = torch.zeros_like(ref, dtype=torch.bool).scatter_(1, ref.topk(k, dim=1).indices, True)
    got = torch.zeros_like(want).scatter_(1, idx, True)
    assert (got == want).all()


@pytest.mark.parametrize("case", ["cancelling", "offset"])
def test_bf16_selection_where_bf16_cannot_rank(case, monkeypatch):
    """Inputs with a large common part against zero-sum encoder rows (the sum cancels: bf16's absolute error
    dwarfs the pre-activations), and a large common b_enc (every pre-activation ~50, bf16's spacing 0.25): the
    margin widens, and past 4k candidates per row the chunk takes a float32 GEMM."""
    g = torch.Generator().manual_seed(1)
    d, n, k = 256, 1024, 16
    W = torch.randn(n, d, generator=g) / d**0.5
    sae = SAE(SAEConfig(d_in=d, d_sae=n, k=k, normalize_activations="none"))
    with torch.no_grad():
        if case == "cancelling":
            sae.W_enc.copy_(W - W.mean(1, keepdim=True))
            xc = 3.0 + 0.05 * torch.randn(600, d, generator=g)
        else:
            sae.W_enc.copy_(W)
            sae.b_enc.fill_(50.0)
            xc = torch.randn(600, d, generator=g)
    dense = []
    addmm = torch.addmm
    monkeypatch.setattr(torch, "addmm", lambda *a, **kw: dense.append(1) or addmm(*a, **kw))
    _, idx = sae.select(xc, torch.bfloat16)
    ref = xc.double() @ sae.W_enc.double().T + sae.b_enc.double()
    top = ref.topk(k + 1, dim=1).values
    clear = (top[:, k - 1] - top[:, k]) > 1e-5 * top[:, k - 1].abs()
    want = torch.zeros_like(ref, dtype=torch.bool).scatter_(1, ref.topk(k, dim=1).indices, True)
    got = torch.zeros_like(want).scatter_(1, idx, True)
    assert (got == want).all(1)[clear].all() and clear.float().mean() > 0.9
    assert dense  # the float32 GEMM ranked them
    if case == "cancelling":  # weights changed in place with no version bump (fused AdamW): nothing stale is used
        sae.W_enc.data.mul_(0.5)
        sae.select(xc, torch.bfloat16)
        sae.W_enc.data.mul_(4.0)
        _, idx = sae.select(xc, torch.bfloat16)
        ref = xc.double() @ sae.W_enc.double().T + sae.b_enc.double()
        want = torch.zeros_like(ref, dtype=torch.bool).scatter_(1, ref.topk(k, dim=1).indices, True)
        got = torch.zeros_like(want).scatter_(1, idx, True)
        assert (got == want).all(1)[clear].all()


def test_bf16_selection_of_rows_with_nan_or_inf_falls_back_to_the_bf16_top_k():
    sae, x = make_sae(d=64, n=512, k=16, dtype=torch.float32)
    xc = normalize(x, "layer_norm")[0] - sae.b_dec
    xc[3], xc[7, 5] = float("nan"), float("inf")
    vals, idx = sae.select(xc, torch.bfloat16)
    assert vals.shape == idx.shape == (40, 16) and vals[3].isnan().all()
    fine = torch.ones(40, dtype=torch.bool)
    fine[[3, 7]] = False
    exact_vals, exact_idx = sae.select(xc)
    assert (idx[fine].sort(1).values == exact_idx[fine].sort(1).values).float().mean() > 0.9


def test_bf16_encoder_selects_aux_k_exactly_over_a_small_dead_set():
    sae, x = make_sae(d=64, n=512, k=16, dtype=torch.float32)
    x_norm = normalize(x, "layer_norm")[0]
    dead = torch.arange(3, 512, 9)  # 57 dead <= 16 x k_aux: the dead set gets its own float32 GEMM
    out = sae.forward_train(x_norm, dead, 8, compute_dtype=torch.bfloat16)
    pre = ((x_norm - sae.b_dec) @ sae.W_enc.T + sae.b_enc)[:, dead]  # float32 reference, dead columns only
    want = pre.topk(8, dim=1).values.relu()
    torch.testing.assert_close(out.aux_acts.sort(1, descending=True).values, want, rtol=1e-5, atol=1e-5)
    assert set(out.aux_indices.flatten().tolist()) <= set(dead.tolist())


def test_aux_k_uses_only_dead_latents_and_at_most_as_many_as_are_dead():
    sae, x = make_sae()
    x_norm = normalize(x, "layer_norm")[0].double()
    dead = torch.tensor([5, 17, 60])
    out = sae.forward_train(x_norm, dead, k_aux=10)  # no "at least k_aux dead" gate: 3 dead -> 3 per token
    assert out.auxk_recon is not None
    _, idx, _, aux_idx = _select(sae, x_norm, dead, 10)
    assert aux_idx.shape == (40, 3) and set(aux_idx.flatten().tolist()) <= {5, 17, 60}
    # decoded without b_dec: zero aux activations give a zero reconstruction
    with torch.no_grad():
        sae.b_enc.fill_(-1e6)
    assert sae.forward_train(x_norm, dead, 10).auxk_recon.abs().max() == 0


def _select(sae, x_norm, dead, k_aux):
    from llama_sae.sae.model import encode_select

    return encode_select(x_norm - sae.b_dec, sae.W_enc.detach(), sae.b_enc.detach(), sae.cfg.k, dead, k_aux)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
# groups used: 16, 16, 8, 4, 8, none (plain topk)
@pytest.mark.parametrize("n, k", [(4096, 32), (4096, 64), (1024, 32), (512, 32), (1000, 7), (256, 32)])
@pytest.mark.parametrize("threads", [2, 3])  # numpy selection up to two threads, torch.topk with more
def test_select_topk_is_exactly_topk(n, k, dtype, threads, monkeypatch):
    from llama_sae.sae.model import select_topk

    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)

    pre = torch.randn(300, n, generator=torch.Generator().manual_seed(n + k)).to(dtype)
    pre[:5] = -pre[:5].abs()  # rows with nothing positive: ReLU zeros
    vals, idx = select_topk(pre, k)
    want = pre.topk(k, dim=-1).values.relu()
    assert torch.equal(vals.sort(1, descending=True).values, want)
    assert torch.equal(pre.gather(1, idx).relu(), vals)
    assert (idx.sort(1).values.diff(dim=1) > 0).all()  # k distinct latents per row


def test_row_blocks_select_what_one_block_selects(monkeypatch):
    from llama_sae.sae import model

    sae, x = make_sae(dtype=torch.float32)
    x_norm = normalize(x, "layer_norm")[0]
    dead = torch.tensor([2, 9, 31, 77])
    whole = sae.forward_train(x_norm, dead, 3)
    monkeypatch.setattr(model, "PRE_BUFFER_BYTES", 96 * 4 * 7)  # 7 rows of pre-activations at a time
    blocks = sae.forward_train(x_norm, dead, 3)
    for a, b in zip(whole, blocks):
        assert torch.equal(a, b)


def test_kernels_against_dense_products():
    g = torch.Generator().manual_seed(3)
    idx = torch.randint(0, 30, (50, 4), generator=g)
    coef = torch.randn(50, 4, generator=g, dtype=torch.float64)
    src = torch.randn(50, 7, generator=g, dtype=torch.float64)
    dense = torch.zeros(50, 30, dtype=torch.float64).scatter_add_(1, idx, coef)  # [N, n]
    torch.testing.assert_close(scatter_rows(idx, coef, src, 30), dense.T @ src)
    table = torch.randn(30, 7, generator=g, dtype=torch.float64)
    torch.testing.assert_close(gather_dot(idx, table, src), (table[idx] * src[:, None]).sum(-1))


@pytest.mark.parametrize("n", [30, 65536, 70000, 2**33])
def test_stable_order_is_a_stable_sort(n):
    """The radix sort behind LatentRows (one 16-bit pass up to 65,536 latents, more above) against numpy's own
    stable sort, and against torch's stable sort (the accelerator path): the same permutation, ties in order."""
    rng = np.random.default_rng(n % 1000)
    keys = rng.integers(0, n, size=5000)
    keys[::7] = keys[0]  # many ties
    order = stable_order(keys, n)
    assert np.array_equal(order, np.argsort(keys, kind="stable"))
    if n < 2**31:
        assert torch.equal(torch.from_numpy(order), torch.sort(torch.from_numpy(keys).int(), stable=True).indices)


def test_latent_rows_pattern_is_latent_major_with_tokens_ascending():
    """Main and aux-k blocks share one CSR pattern: row i lists the tokens that selected latent i, in order."""
    g = torch.Generator().manual_seed(5)
    main, aux = torch.randint(0, 40, (9, 3), generator=g), torch.randint(0, 40, (9, 5), generator=g)
    rows = LatentRows([main, aux], 40)
    expect = [[t for t in range(18) for j in (main[t] if t < 9 else aux[t - 9]).tolist() if j == i]
              for i in range(40)]
    got = [rows.tokens[rows.crow[i]:rows.crow[i + 1]].tolist() for i in range(40)]
    assert got == expect and rows.shape == (40, 18)


def test_decoder_stays_unit_norm_and_its_gradient_is_projected():
    from llama_sae.sae.train import TrainConfig, World, make_runs, train_step

    cfg = TrainConfig(d_sae=96, k=5, batch_size=40, lr=1e-2, tokens=400)
    _, x = make_sae(dtype=torch.float32)
    runs = make_runs(cfg, 24, {}, torch.device("cpu"))
    sae = runs[0].sae
    sae.init_(normalize(x, "layer_norm")[0])
    out = sae.forward_train(normalize(x, "layer_norm")[0])
    sae.backward_train_(out, out.recon.clone())
    sae.project_decoder_grad_()
    parallel = (sae.W_dec.grad * sae.W_dec).sum(1)  # [n]: component along each latent's direction
    assert parallel.abs().max() < 1e-5 * sae.W_dec.grad.abs().max()
    before = sae.W_dec.detach().clone()
    train_step(runs, x, cfg, World(), 0, 10, 40)
    assert not torch.equal(before, sae.W_dec)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(96), rtol=0, atol=1e-6)


def test_layer_norm_is_saelens_formula():
    x = torch.randn(6, 10) * 5 + 2
    want = (x - x.mean(-1, keepdim=True)) / (x.std(-1, keepdim=True, unbiased=True) + LN_EPS)
    got, mu, std = normalize(x, "layer_norm")
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got * std + mu, x, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("norm", ["none", "layer_norm"])
def test_inference_api(norm):
    sae, x = make_sae(norm=norm, dtype=torch.float32)
    vals, idx = sae.encode_topk(x)
    dense = sae.encode(x)
    assert dense.shape == (40, 96) and vals.shape == idx.shape == (40, 5)
    assert ((dense != 0).sum(1) <= 5).all() and (vals >= 0).all()
    torch.testing.assert_close(dense.gather(1, idx), vals)
    recon = sae(x)
    torch.testing.assert_close(sae.decode(dense, x), recon, rtol=1e-5, atol=1e-5)
    # the reference: the equations of the class docstring, written out densely
    x_norm, mu, std = normalize(x, norm)
    pre = (x_norm - sae.b_dec) @ sae.W_enc.T + sae.b_enc
    top = pre.topk(5, dim=1)
    h = torch.zeros_like(pre).scatter(1, top.indices, top.values.relu())
    want = h @ sae.W_dec + sae.b_dec
    want = want if mu is None else want * std + mu
    torch.testing.assert_close(recon, want.detach(), rtol=1e-5, atol=1e-5)
    assert sae(x.view(4, 10, 24)).shape == (4, 10, 24)


def _golden_sae() -> SAE:
    sae = SAE(SAEConfig(d_in=3, d_sae=4, k=2, hook_name="resid_post.1", model_name="tiny", context_size=64))
    with torch.no_grad():
        for i, p in enumerate(sae.parameters()):
            p.copy_(torch.arange(p.numel(), dtype=torch.float32).view_as(p) / 8 + i)
    return sae


def test_format_golden_bytes(tmp_path):
    save(_golden_sae(), tmp_path, sparsity=torch.tensor([-1.0, -2.0, -3.0, -10.0]), trained_tokens=1000)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg == {"architecture": "topk", "d_in": 3, "d_sae": 4, "k": 2, "dtype": "float32", "device": "cpu",
                   "apply_b_dec_to_input": True, "normalize_activations": "layer_norm", "reshape_activations": "none",
                   "rescale_acts_by_decoder_norm": False,
                   "metadata": {"model_name": "tiny", "hook_name": "resid_post.1", "context_size": 64,
                                "prepend_bos": True, "hf_hook_name": "model.layers.1",
                                "sae_lens_version": "6.0.0", "trained_tokens": 1000}}
    weights = (tmp_path / "sae_weights.safetensors").read_bytes()
    header_len = int.from_bytes(weights[:8], "little")
    header = json.loads(weights[8:8 + header_len])
    assert {k: (v["dtype"], v["shape"]) for k, v in header.items()} == {
        "W_enc": ("F32", [3, 4]), "b_enc": ("F32", [4]), "W_dec": ("F32", [4, 3]), "b_dec": ("F32", [3])}
    start, stop = header["W_enc"]["data_offsets"]  # SAELens layout: W_enc is [d_in, d_sae], our W_enc transposed
    want = (torch.arange(12, dtype=torch.float32).view(4, 3) / 8).T.contiguous()
    assert weights[8 + header_len + start:8 + header_len + stop] == want.numpy().tobytes()
    assert hashlib.sha256(weights).hexdigest()[:16] == "ab5e5202b21ed62b"  # any change to the bytes is loud


def test_save_load_round_trip(tmp_path):
    sae, x = make_sae(dtype=torch.float32)
    sae.save(tmp_path / "sae")
    back = load(tmp_path / "sae")
    assert back.cfg == sae.cfg
    for (name, a), b in zip(sae.named_parameters(), back.parameters()):
        assert torch.equal(a, b), name
    torch.testing.assert_close(back(x), sae(x), rtol=0, atol=0)
    assert load_sparsity(tmp_path / "sae") is None


def test_load_rejects_what_it_cannot_run(tmp_path):
    save(_golden_sae(), tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, "architecture": "jumprelu"}))
    with pytest.raises(UserError, match="only 'topk' SAEs load"):
        load(tmp_path)
    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, "d_in": 5}))
    with pytest.raises(UserError, match=r"W_enc should be \(5, 4\)"):
        load(tmp_path)
    with pytest.raises(UserError, match="missing does not exist"):
        load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no cfg.json"):
        load(tmp_path / "empty")
    with pytest.raises(ValueError, match="k=4 must be smaller than d_sae=4"):
        SAEConfig(d_in=3, d_sae=4, k=4)


@pytest.mark.parametrize("norm", ["layer_norm", "none"])
def test_saelens_loads_our_files_and_agrees(tmp_path, norm):
    sae_lens = pytest.importorskip("sae_lens", reason="sae-lens is not installed: pip install -e '.[dev]'")
    sae, x = make_sae(norm=norm, dtype=torch.float32)
    sae.cfg = sae.cfg.model_copy(update={"hook_name": "resid_post.1", "model_name": "tiny"})
    sae.save(tmp_path)
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path))
    assert (theirs.cfg.architecture(), theirs.cfg.k, theirs.cfg.normalize_activations) == ("topk", 5, norm)
    assert theirs.cfg.metadata.hook_name == "resid_post.1" and theirs.cfg.metadata.model_name == "tiny"
    feats = theirs.encode(x)
    torch.testing.assert_close(feats, sae.encode(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(theirs.decode(feats), sae(x), rtol=1e-5, atol=1e-4)


def test_select_topk_few_rows_uses_one_topk_and_agrees():
    from llama_sae.sae.model import SMALL_SELECT, select_topk

    pre = torch.randn(3, 1024, generator=torch.Generator().manual_seed(1))
    assert pre.numel() <= SMALL_SELECT
    vals, idx = select_topk(pre, 32)
    assert torch.equal(vals.sort(1).values, pre.topk(32, dim=-1).values.relu().sort(1).values)
    assert torch.equal(pre.gather(1, idx).relu(), vals)


def test_top_k_positions_ties_and_nan_rows_match_torch_topk():
    import numpy as np

    from llama_sae.sae.model import top_k_positions

    g = torch.Generator().manual_seed(5)
    a = torch.randint(0, 6, (50, 40), generator=g).float()  # many ties at the k-th value
    a[3, 7] = float("nan")  # NaN ranks above every number, as in torch.topk
    a[4] = float("nan")
    pos = torch.from_numpy(top_k_positions(a.numpy(), 9))
    got, want = a.gather(1, pos), a.topk(9, dim=-1).values
    assert torch.equal(got.nan_to_num(99).sort(1).values, want.nan_to_num(99).sort(1).values)
    assert (pos.sort(1).values.diff(dim=1) > 0).all()  # distinct positions
    b = torch.randn(2, 40, generator=g)  # one row one short (a NaN), one row one over (a tie): M·k in total
    b[0, 5], b[1, :2] = float("nan"), b[1].max() + 1
    b[1, 2:10] = b[1].max() + 2  # row 1: eight above the tied pair; with k 9 the k-th value is tied
    pos = torch.from_numpy(top_k_positions(b.numpy(), 9))
    got, want = b.gather(1, pos), b.topk(9, dim=-1).values
    assert torch.equal(got.nan_to_num(99).sort(1).values, want.nan_to_num(99).sort(1).values)
    assert (pos.sort(1).values.diff(dim=1) > 0).all()
    wide = torch.randn(8, 700, generator=g)  # wider than SORT_WIDTH: the k-th value by partition
    p = top_k_positions(wide.numpy(), 40)
    assert np.array_equal(np.sort(p, 1), wide.topk(40, dim=-1).indices.sort(1).values.numpy())
    clean = torch.randn(64, 300, generator=g, dtype=torch.float64)  # float64 is selected without rounding
    p = top_k_positions(clean.numpy(), 17)
    assert np.array_equal(np.sort(p, 1), clean.topk(17, dim=-1).indices.sort(1).values.numpy())


def test_inference_sees_weight_changes_and_bf16_selection_recomputes_values():
    sae, x = make_sae(d=32, n=256, k=8, dtype=torch.float32)
    before = sae(x)
    with torch.no_grad():
        sae.W_enc.mul_(-1)  # in place: the cached [W_enc | b_enc] must be rebuilt
    flipped = sae(x)
    assert not torch.allclose(before, flipped, atol=1e-3)
    fresh = SAE(sae.cfg)
    fresh.load_state_dict(sae.state_dict())
    torch.testing.assert_close(flipped, fresh(x), atol=0, rtol=0)
    x_norm = normalize(x, "layer_norm")[0] - sae.b_dec
    _, idx_a = sae.select(x_norm, torch.bfloat16)
    sae.W_enc.data.mul_(-1)  # like fused AdamW: no version bump, so the cached bf16 matrix is stale ...
    sae.weights_changed()  # ... until the trainer says so
    _, idx_b = sae.select(x_norm, torch.bfloat16)
    assert not torch.equal(idx_a, idx_b)
    sae.W_enc.data.mul_(-1)
    sae.weights_changed()
    vals32, idx32 = sae.select(x_norm)
    vals16, idx16 = sae.select(x_norm, torch.bfloat16)
    assert vals16.dtype == torch.float32
    exact = (x_norm @ sae.W_enc.T + sae.b_enc).relu()  # [N, n] float32 reference
    torch.testing.assert_close(vals16, exact.gather(1, idx16), atol=1e-5, rtol=0)  # values are exact
    same = (idx16.sort(1).values == idx32.sort(1).values).all(1)
    assert same.float().mean() > 0.8  # bf16 chooses differently only at near-ties ...
    kth = exact.topk(9, dim=-1).values  # ... where the k-th and (k+1)-th lie within bf16 rounding
    assert ((kth[~same, 7] - kth[~same, 8]) < 0.02 * kth[~same, 7].abs().clamp_min(1)).all()


def test_inference_shapes_no_tokens_and_dtype():
    """decode keeps leading dims ([B, T, d_sae] -> [B, T, d_in]) with each token's own statistics; zero tokens give
    empty results; an SAE cast away from float32 says what to do instead of failing inside a matmul."""
    sae, x = make_sae(norm="layer_norm", dtype=torch.float32)
    x3 = x.view(4, 10, -1)
    dense = sae.encode(x3)  # encode keeps the leading dims too (SAELens's encode does)
    assert dense.shape == (4, 10, 96) and torch.equal(dense.view(40, -1), sae.encode(x))
    assert sae.decode(dense, x3).shape == (4, 10, x.shape[1])
    torch.testing.assert_close(sae.decode(dense, x3), sae(x3), rtol=1e-5, atol=1e-5)  # token by token, not mixed
    with pytest.raises(ValueError, match="x has tokens"):
        sae.decode(dense, x)
    empty = x[:0]
    vals, idx = sae.encode_topk(empty)
    assert vals.shape == idx.shape == (0, 5) and sae.encode(empty).shape == (0, 96) and sae(empty).shape == (0, 24)
    with pytest.raises(TypeError, match="SAEs run in float32 here \\(call sae.float\\(\\)"):
        copy.deepcopy(sae).to(torch.bfloat16)(x)


@pytest.mark.parametrize("d", [63, 64])  # d + 1 already a multiple of AUG_ALIGN, and one padded with 7 zeros
def test_augmented_gemm_pads_k_with_zeros_on_a_gpu_even_in_dirty_scratch(d):
    from llama_sae.sae.model import AUG_ALIGN, augmented_width, encode_select

    K = augmented_width(d, "cuda")  # arithmetic only: no GPU needed
    assert K % AUG_ALIGN == 0 and d + 1 <= K < d + 1 + AUG_ALIGN and augmented_width(d) == d + 1  # CPU: unpadded
    g = torch.Generator().manual_seed(4)
    W, b, xc = torch.randn(256, d, generator=g), torch.randn(256, generator=g), torch.randn(40, d, generator=g)
    pre = (xc.double() @ W.double().T + b.double())  # float64 reference
    want_vals, want_idx = pre.topk(8, dim=1)
    padded = torch.cat([W, b[:, None], torch.zeros(256, K - d - 1)], 1)  # what SAE.encoder_matrix builds on a GPU
    scratch = {"xq": torch.full((40, K), float("nan"))}  # a reused buffer: its padding columns must be zeroed
    for kw in ({"scratch": {"W": torch.full((256, d + 1), float("nan"))}}, {"W_aug": padded, "scratch": scratch}):
        vals, idx, _, _ = encode_select(xc, W, b, 8, **kw)
        assert torch.equal(idx.sort(1).values, want_idx.sort(1).values)
        torch.testing.assert_close(vals.double().sort(1).values, want_vals.relu().sort(1).values, rtol=1e-5,
                                   atol=1e-5)


@pytest.mark.parametrize("shape", [(96, 32), (16, 40)])
def test_orthogonal_init_is_torch_orthogonal_bit_for_bit_on_the_cpu(shape):
    from llama_sae.sae.model import orthogonal

    want = torch.empty(*shape)
    torch.nn.init.orthogonal_(want, generator=torch.Generator().manual_seed(3))
    got = orthogonal(*shape, torch.Generator().manual_seed(3), torch.device("cpu"))
    assert torch.equal(got, want)
    small = min(shape)
    gram = got.double().T @ got.double() if shape[0] >= shape[1] else got.double() @ got.double().T
    torch.testing.assert_close(gram, torch.eye(small, dtype=torch.float64), atol=1e-5, rtol=0)
