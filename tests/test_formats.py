"""SAE files: sparsify and the seed's .pth read (and sparsify written) with numerics equal to each peer's own
math, pre-6 SAELens configs, the hub (a local fake server), the ``llama-sae sae`` commands, and bad input."""

from __future__ import annotations

import json
import pickle
import re
import shutil

import pytest
import torch
from safetensors.torch import save_file
from test_sae import make_sae
from typer.testing import CliRunner

from llama_sae.cli import app
from llama_sae.errors import UserError
from llama_sae.sae import load
from llama_sae.sae.formats import convert, describe, hf_module_name, our_hook_name, save, save_sparsify

runner = CliRunner()


class _NotATensor:
    """A pickled object of a class a weights-only load refuses."""


def sparsify_reference(w: dict, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """sparsify's SparseCoder, written out: pre = (x - b_dec) @ encoder.weight.T + encoder.bias, ReLU, top k;
    decode = Σ acts · W_dec rows + b_dec. Returns (dense latents [N, n], reconstruction [N, d]), float64."""
    x, w = x.double(), {name: t.double() for name, t in w.items()}
    pre = (x - w["b_dec"]) @ w["encoder.weight"].T + w["encoder.bias"]
    top = pre.relu().topk(k, dim=-1)
    dense = torch.zeros_like(pre).scatter(1, top.indices, top.values)
    return dense, dense @ w["W_dec"] + w["b_dec"]


def seed_reference(state: dict, x: torch.Tensor, k: int, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """The seed's TopKSparseAutoencoder.forward, written out (its preprocess_input, forward_1d_normalized,
    decode_latent, postprocess_output). Returns (dense latents, reconstruction), float64."""
    x, s = x.double(), {name: t.double() for name, t in state.items()}
    mean, norm = x.mean(-1, keepdim=True), x.std(-1, keepdim=True) + eps
    h = ((x - mean) / norm - s["b_pre"]) @ s["encoder.weight"].T + s["encoder.bias"]
    top = h.topk(k, dim=-1)
    h_sparse = torch.zeros_like(h).scatter(1, top.indices, top.values.relu())
    return h_sparse, (h_sparse @ s["decoder.weight"].T + s["b_pre"]) * norm + mean


def seed_state(d=24, n=96, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    dec = torch.randn(d, n, generator=g)
    return {"b_pre": 0.1 * torch.randn(d, generator=g), "encoder.weight": torch.randn(n, d, generator=g),
            "encoder.bias": 0.3 * torch.randn(n, generator=g), "decoder.weight": dec / dec.norm(dim=0)}


# --------------------------------------------------------------------------- sparsify
def test_sparsify_written_and_read_match_its_math(tmp_path):
    sae, x = make_sae(norm="none", dtype=torch.float32)
    save_sparsify(sae, tmp_path / "layers.2.mlp")
    cfg = json.loads((tmp_path / "layers.2.mlp" / "cfg.json").read_text())
    assert {key: cfg[key] for key in ("activation", "num_latents", "k", "d_in", "transcode")} == {
        "activation": "topk", "num_latents": 96, "k": 5, "d_in": 24, "transcode": False}
    from safetensors.torch import load_file

    w = load_file(tmp_path / "layers.2.mlp" / "sae.safetensors")
    assert set(w) == {"encoder.weight", "encoder.bias", "W_dec", "b_dec"}
    dense, recon = sparsify_reference(w, x, k=5)
    torch.testing.assert_close(sae.encode(x).double(), dense, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae(x).double(), recon, rtol=1e-5, atol=1e-5)
    back = load(tmp_path / "layers.2.mlp")
    assert back.cfg.hook_name == "mlp_out.2" and back.cfg.normalize_activations == "none"  # from the dir name
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(back, name), getattr(sae, name)), name


def test_sparsify_files_as_sparsify_writes_them(tmp_path):
    g = torch.Generator().manual_seed(1)
    w = {"encoder.weight": torch.randn(64, 16, generator=g), "encoder.bias": torch.randn(64, generator=g),
         "W_dec": torch.randn(64, 16, generator=g), "b_dec": torch.randn(16, generator=g)}
    path = tmp_path / "layers.3"
    path.mkdir()
    save_file(w, path / "sae.safetensors")
    (path / "cfg.json").write_text(json.dumps({"activation": "topk", "expansion_factor": 4, "normalize_decoder": True,
                                               "num_latents": 0, "k": 6, "multi_topk": False,
                                               "skip_connection": False, "transcode": False, "d_in": 16}))
    sae = load(path)
    assert (sae.cfg.d_sae, sae.cfg.k, sae.cfg.hook_name) == (64, 6, "resid_post.3")  # d_sae = 4 x 16
    x = torch.randn(30, 16, generator=g) * 2
    dense, recon = sparsify_reference(w, x, k=6)
    torch.testing.assert_close(sae.encode(x).double(), dense, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae(x).double(), recon, rtol=1e-5, atol=1e-5)


def test_real_sparsify_loads_our_export(tmp_path):
    sparsify = pytest.importorskip("sparsify", reason="eai-sparsify is not installed: pip install -e '.[dev]'")
    sae, x = make_sae(norm="none", dtype=torch.float32)
    save_sparsify(sae, tmp_path / "s")
    theirs = sparsify.SparseCoder.load_from_disk(tmp_path / "s")
    enc = theirs.encode(x)
    dense = torch.zeros(x.shape[0], 96).scatter(1, enc.top_indices, enc.top_acts)
    torch.testing.assert_close(dense, sae.encode(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(theirs.decode(enc.top_acts, enc.top_indices), sae(x), rtol=1e-5, atol=1e-5)


def test_sparsify_cannot_hold_layer_norm(tmp_path):
    sae, _ = make_sae(norm="layer_norm", dtype=torch.float32)
    with pytest.raises(UserError, match="no input normalization.*--to saelens"):
        save_sparsify(sae, tmp_path / "s")


# --------------------------------------------------------------------------- the seed
def test_seed_checkpoint_reads_with_its_math(tmp_path):
    state = seed_state()
    torch.save(state, tmp_path / "model_checkpoint_epoch-10.pth")
    rows = dict(describe(tmp_path / "model_checkpoint_epoch-10.pth"))
    assert rows["format"] == "seed" and rows["k"] == "missing" and rows["hook point"] == "missing"
    notes = [v for key, v in describe(tmp_path / "model_checkpoint_epoch-10.pth") if key == "note"]
    assert any("--k 64" in n for n in notes) and any("attn_in.23" in n for n in notes)
    with pytest.raises(UserError, match="does not store it\\): convert it once with `llama-sae sae convert "
                                        ".* --k 64 --hook attn_in.L"):
        load(tmp_path / "model_checkpoint_epoch-10.pth")
    sae = load(tmp_path / "model_checkpoint_epoch-10.pth", k=5, hook_name="attn_in.3")
    assert (sae.cfg.d_in, sae.cfg.d_sae, sae.cfg.k, sae.cfg.hook_name, sae.cfg.normalize_activations) == (
        24, 96, 5, "attn_in.3", "layer_norm")
    x = torch.randn(40, 24, generator=torch.Generator().manual_seed(2)) * 3 + 1
    dense, recon = seed_reference(state, x, k=5, eps=1e-5)  # ours reads with SAELens's eps: exact there
    torch.testing.assert_close(sae.encode(x).double(), dense, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae(x).double(), recon, rtol=1e-5, atol=1e-4)
    _, recon_seed = seed_reference(state, x, k=5)  # and the seed's own eps 1e-6 is within float noise of it
    torch.testing.assert_close(sae(x).double(), recon_seed, rtol=1e-4, atol=1e-3)


def test_a_convert_killed_mid_write_leaves_nothing_that_blocks_or_stays(tmp_path):
    sae, _ = make_sae(dtype=torch.float32)
    save(sae, tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    (out / ".tmpB9vsEF").write_bytes(b"half of safetensors' own temp file")  # what a kill -9 left
    (out / ".sae_weights.safetensors.tmp4242").write_bytes(b"")
    result = runner.invoke(app, ["sae", "convert", str(tmp_path / "src"), "--to", "saelens", "--out", str(out)])
    assert result.exit_code == 0, result.output  # used to be "not empty: it holds .tmpB9vsEF"
    assert sorted(p.name for p in out.iterdir()) == ["cfg.json", "sae_weights.safetensors"]


def test_info_shows_trained_tokens_and_a_bad_k_override_names_the_option(tmp_path):
    sae, _ = make_sae(dtype=torch.float32)
    save(sae, tmp_path / "s", trained_tokens=3_416_064)
    assert dict(describe(tmp_path / "s"))["trained tokens"] == "3,416,064"
    with pytest.raises(UserError, match="k=500 must be smaller than d_sae=96.*: pass a smaller --k$"):
        load(tmp_path / "s", k=500)  # used to say "fix it in cfg.json", which holds a fine k


def test_two_converts_into_one_directory_are_refused(tmp_path):
    from llama_sae.fileio import lock_output

    sae, _ = make_sae(dtype=torch.float32)
    save(sae, tmp_path / "src")
    with lock_output(tmp_path / "out", "the converted SAE"):  # another convert holds it
        result = runner.invoke(app, ["sae", "convert", str(tmp_path / "src"), "--to", "saelens", "--out",
                                     str(tmp_path / "out")])
    assert isinstance(result.exception, UserError) and "another run is using the converted SAE" in str(
        result.exception)
    assert not (tmp_path / "out").exists()


def test_a_save_killed_before_its_config_leaves_no_old_config_beside_new_weights(tmp_path, monkeypatch):
    from llama_sae.sae import formats

    old, _ = make_sae(dtype=torch.float32)  # layer_norm
    new, _ = make_sae(norm="none", dtype=torch.float32, seed=1)  # the same shape, another normalization
    save(old, tmp_path / "s")

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # stands for a kill after the weights, before cfg.json

    import errno

    import safetensors.torch

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)  # a failed write: the old SAE stays whole
    with pytest.raises(OSError):
        save(new, tmp_path / "s")
    monkeypatch.undo()
    assert load(tmp_path / "s").cfg.normalize_activations == "layer_norm"
    monkeypatch.setattr(formats, "atomic_write_json", killed)
    with pytest.raises(KeyboardInterrupt):
        save(new, tmp_path / "s")
    monkeypatch.undo()
    with pytest.raises(UserError):  # used to load the new weights with the old cfg.json's layer_norm
        load(tmp_path / "s")


def test_a_seed_checkpoint_whose_shapes_disagree_is_named_by_info(tmp_path):
    state = seed_state()
    state["decoder.weight"] = state["decoder.weight"][:, :50]  # 50 latents' decoder for a 96-latent encoder
    torch.save(state, tmp_path / "seed.pth")
    rows = dict(describe(tmp_path / "seed.pth"))  # used to say "loads with --k K ..."
    assert rows["verdict"].startswith("does not load: weights: W_dec should be [96, 24] by the checkpoint's encoder")
    with pytest.raises(UserError, match="the weights and its shapes do not belong together"):  # not "cfg.json"
        load(tmp_path / "seed.pth", k=5, hook_name="attn_in.1")


def test_seed_checkpoint_with_ddp_prefix_and_convert(tmp_path):
    state = seed_state(seed=3)
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "seed.pth")
    out = convert(tmp_path / "seed.pth", "saelens", tmp_path / "conv", k=5, hook_name="attn_in.1")
    back = load(out)
    assert back.cfg.hook_name == "attn_in.1" and back.cfg.k == 5
    metadata = json.loads((out / "cfg.json").read_text())["metadata"]
    assert metadata["hf_hook_name"] == "model.layers.1.input_layernorm"
    assert metadata["prepend_bos"] is False and back.cfg.prepend_bos is False  # the seed fed no BOS
    torch.testing.assert_close(back.W_dec, state["decoder.weight"].T)


# --------------------------------------------------------------------------- SAELens
def test_pre_6_saelens_config_reads(tmp_path):
    sae, x = make_sae(dtype=torch.float32)
    save(sae, tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    old = {"d_in": 24, "d_sae": 96, "hook_point": "blocks.4.hook_resid_post", "model_name": "llama",
           "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 5}, "apply_b_dec_to_input": True,
           "normalize_activations": cfg["normalize_activations"], "context_size": 128}
    (tmp_path / "cfg.json").write_text(json.dumps(old))
    back = load(tmp_path)
    assert (back.cfg.k, back.cfg.hook_name, back.cfg.model_name, back.cfg.context_size) == (
        5, "resid_post.4", "llama", 128)
    torch.testing.assert_close(back(x), sae(x), rtol=0, atol=0)


def test_pre_6_standard_architecture_with_topk_activation_reads(tmp_path):
    """SAELens before 6 wrote TopK SAEs as architecture "standard" with activation_fn "topk" (and loads them as
    TopK): so do we; a really standard (ReLU) SAE is still refused."""
    sae, x = make_sae(dtype=torch.float32)
    save(sae, tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    old = {"architecture": "standard", "d_in": 24, "d_sae": 96, "hook_name": "blocks.2.hook_resid_pre",
           "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 5}, "apply_b_dec_to_input": True,
           "normalize_activations": cfg["normalize_activations"]}
    (tmp_path / "cfg.json").write_text(json.dumps(old))
    back = load(tmp_path)
    assert (back.cfg.k, back.cfg.hook_name) == (5, "resid_pre.2")
    torch.testing.assert_close(back(x), sae(x), rtol=0, atol=0)
    (tmp_path / "cfg.json").write_text(json.dumps({**old, "activation_fn_str": "relu"}))
    with pytest.raises(UserError, match="architecture 'standard' is not supported: only 'topk' SAEs load"):
        load(tmp_path)


def test_hook_name_translation():
    assert our_hook_name("blocks.7.hook_mlp_out") == ("mlp_out.7", None)
    assert our_hook_name("model.layers.2.self_attn") == ("attn_out.2", None)
    hook, note = our_hook_name("blocks.1.ln1.hook_normalized")  # x / rms(x) before the weight: not our attn_in
    assert hook is None and "before its weight; attn_in.1 here includes the weight" in note
    assert our_hook_name("blocks.4.ln2.hook_normalized")[0] is None
    assert our_hook_name("blocks.1.attn.hook_z")[0] is None
    assert our_hook_name("layers.03") == our_hook_name("resid_post.03") == ("resid_post.3", None)  # sparsify dirs
    assert our_hook_name("blocks.07.hook_mlp_out") == ("mlp_out.7", None)
    assert our_hook_name(hf_module_name("resid_pre.3"))[0] == "resid_post.2"  # the same activation
    for hook in ("resid_pre.0", "attn_in.2", "attn_out.2", "mlp_in.2", "mlp_out.2", "resid_post.2"):
        assert our_hook_name(hf_module_name(hook))[0] == hook


# --------------------------------------------------------------------------- bad input
def test_bad_files_are_one_line_errors_naming_the_fix(tmp_path):
    sae, _ = make_sae(dtype=torch.float32)
    save(sae, tmp_path / "s")
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    del cfg["k"]
    (tmp_path / "s" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match='has no "k"\\): add "k": N to cfg.json, or convert it with '
                                        '`llama-sae sae convert PATH --k N`'):
        load(tmp_path / "s")
    assert load(tmp_path / "s", k=5).cfg.k == 5
    assert load(tmp_path / "s" / "cfg.json", k=5).cfg.k == 5  # a file of the directory names the directory
    for bad in ("abc", True, [5], 5.5):  # a hand-edited k: refused in one line, shown by `sae info`
        (tmp_path / "s" / "cfg.json").write_text(json.dumps({**cfg, "k": bad}))
        with pytest.raises(UserError, match=re.escape(f'k is {bad!r}, not a whole number of latents: set "k": N')):
            load(tmp_path / "s")
        rows = dict(describe(tmp_path / "s"))
        assert rows["k"] == str(bad) and rows["verdict"].startswith("does not load: ")
    for fine in ("5", 5.0):  # a whole number written as a string or a float reads as that number
        (tmp_path / "s" / "cfg.json").write_text(json.dumps({**cfg, "k": fine}))
        assert load(tmp_path / "s").cfg.k == 5 and dict(describe(tmp_path / "s"))["verdict"].startswith("loads")
    for key, value, kind in [("metadata", "x", "a JSON object"), ("d_in", True, "a whole number"),
                             ("normalize_activations", [1], "a string or true or false"),
                             ("activation_fn_kwargs", "x", "a JSON object")]:  # hand edits of another type
        (tmp_path / "s" / "cfg.json").write_text(json.dumps({**cfg, key: value}))
        with pytest.raises(UserError, match=re.escape(f"{key} is {value!r}, not {kind}: the config is damaged")):
            describe(tmp_path / "s")
    (tmp_path / "s" / "cfg.json").write_text(json.dumps({**cfg, "metadata": {"hook_name": 5}}))
    with pytest.raises(UserError, match="hook_name is 5, not a string"):
        load(tmp_path / "s", k=5)
    (tmp_path / "s" / "cfg.json").write_text(json.dumps(cfg))
    weights = (tmp_path / "s" / "sae_weights.safetensors").read_bytes()
    rows = dict(describe(tmp_path / "s"))  # `sae info` reads the header: tensors and shapes, no notes
    assert rows["weights"] == "sae_weights.safetensors: W_dec [96, 24], W_enc [24, 96], b_dec [24], b_enc [96]"
    (tmp_path / "s" / "sae_weights.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(UserError, match="not a readable safetensors file .* truncated or not an SAE"):
        load(tmp_path / "s", k=5)
    assert dict(describe(tmp_path / "s"))["weights"].startswith("unreadable: ")  # info shows the config, and this
    cfg["d_sae"] = 95
    (tmp_path / "s" / "sae_weights.safetensors").write_bytes(weights)
    (tmp_path / "s" / "cfg.json").write_text(json.dumps(cfg))
    notes = [v for key, v in describe(tmp_path / "s") if key == "note"]
    assert "weights: W_enc should be [24, 95] by cfg.json, found [24, 96]: the weights and cfg.json do not " \
           "belong together" in notes and len(notes) == 5  # W_enc, b_enc, W_dec; no k, no hook point
    cfg["d_sae"] = 96
    (tmp_path / "s" / "cfg.json").write_text(json.dumps(cfg))
    torch.save(seed_state(), tmp_path / "seed.pth")
    (tmp_path / "cut.pth").write_bytes((tmp_path / "seed.pth").read_bytes()[:3000])
    with pytest.raises(UserError, match="not a readable torch checkpoint .*: it is truncated or not the seed's"):
        load(tmp_path / "cut.pth", k=5)
    (tmp_path / "foreign.pth").write_bytes(pickle.dumps(UserError("not weights"), protocol=2))
    with pytest.raises(UserError, match="holds pickled Python objects besides tensors, which a weights-only load "
                                        "refuses") as refused:
        load(tmp_path / "foreign.pth", k=5)
    assert "\x1b" not in str(refused.value)  # none of torch's terminal colour codes
    torch.save({"x": _NotATensor()}, tmp_path / "objects.pth")
    with pytest.raises(UserError, match="holds pickled Python objects"):
        load(tmp_path / "objects.pth", k=5)
    (tmp_path / "notes.toml").write_text("[project]\nname = 'x'\n")  # a text file: not called pickled objects
    with pytest.raises(UserError, match="notes.toml: not a torch checkpoint"):
        load(tmp_path / "notes.toml", k=5)
    torch.save({"W": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(UserError, match="not the seed's SAE checkpoint: expected tensors b_pre"):
        load(tmp_path / "other.pth", k=5)
    with pytest.raises(UserError, match="has no equivalent here: use KIND.LAYER"):
        load(tmp_path / "seed.pth", k=5, hook_name="blocks.1.attn.hook_z")
    with pytest.raises(UserError, match="k=96 must be smaller than d_sae=96"):
        load(tmp_path / "seed.pth", k=96)


# --------------------------------------------------------------------------- CLI
def test_cli_info_and_convert(tmp_path):
    sae, x = make_sae(norm="none", dtype=torch.float32)
    save(sae, tmp_path / "lens", sparsity=torch.tensor([-10.0] * 6 + [-2.0] * 90))
    result = runner.invoke(app, ["sae", "info", str(tmp_path / "lens")])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.replace("│", " ").split())  # the table wraps long cells
    assert "format saelens" in text and "d_sae 96" in text and "6 latents never fired" in text
    result = runner.invoke(app, ["sae", "convert", str(tmp_path / "lens"), "--to", "sparsify",
                                 "--out", str(tmp_path / "sp")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["sae", "convert", str(tmp_path / "sp"), "--to", "saelens",
                                 "--out", str(tmp_path / "lens2")])
    assert result.exit_code == 0, result.output
    back = load(tmp_path / "lens2")
    assert back.cfg == sae.cfg
    torch.testing.assert_close(back(x), sae(x), rtol=0, atol=0)
    result = runner.invoke(app, ["sae", "convert", str(tmp_path / "lens"), "--to", "onnx", "--out", str(tmp_path / "o")
                                 ])
    assert isinstance(result.exception, UserError) and "use --to saelens or --to sparsify" in str(result.exception)
    # an existing SAE directory is not written over without --overwrite
    before = (tmp_path / "lens2" / "sae_weights.safetensors").read_bytes()
    result = runner.invoke(app, ["sae", "convert", str(tmp_path / "sp"), "--to", "saelens", "--out", str(tmp_path)])
    assert isinstance(result.exception, UserError) and "not empty" in str(result.exception)
    result = runner.invoke(app, ["sae", "convert", str(tmp_path / "sp"), "--to", "saelens",
                                 "--out", str(tmp_path / "lens2"), "--overwrite"])
    assert result.exit_code == 0 and (tmp_path / "lens2" / "sae_weights.safetensors").read_bytes() == before
    assert "verdict loads" in " ".join(runner.invoke(app, ["sae", "info", str(tmp_path / "lens2")]).output.replace(
        "│", " ").split())
    # convert keeps the metadata it does not write itself (training facts, dataset), and an unreadable
    # optional sparsity file is skipped with a note rather than failing the conversion
    save(sae, tmp_path / "meta", sparsity=torch.zeros(96), trained_tokens=1234, dataset="tinyworld")
    sparsity = tmp_path / "meta" / "sparsity.safetensors"
    sparsity.write_bytes(sparsity.read_bytes()[:40])
    result = runner.invoke(app, ["sae", "convert", str(tmp_path / "meta"), "--to", "sparsify", "--out",
                                 str(tmp_path / "meta_sp")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["sae", "convert", str(tmp_path / "meta_sp"), "--to", "saelens", "--out",
                                 str(tmp_path / "meta_back")])
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "meta_back" / "cfg.json").read_text())["metadata"]
    assert (meta["trained_tokens"], meta["dataset"], meta["hook_name"]) == (1234, "tinyworld", sae.cfg.hook_name)
    result = runner.invoke(app, ["sae", "convert", str(tmp_path / "meta"), "--to", "saelens", "--out",
                                 str(tmp_path / "meta_sl")])
    assert result.exit_code == 0 and "sparsity.safetensors skipped, it is unreadable" in result.output
    assert not (tmp_path / "meta_sl" / "sparsity.safetensors").exists()
    for i, tensors in enumerate(({"log_sparsity": torch.zeros(96)}, {"sparsity": torch.zeros(10)})):  # not ours
        save_file(tensors, str(sparsity))
        result = runner.invoke(app, ["sae", "convert", str(tmp_path / "meta"), "--to", "saelens", "--out",
                                     str(tmp_path / f"odd{i}")])
        assert result.exit_code == 0 and "not the SAE's 96 log10 firing rates" in " ".join(result.output.split())
        assert not (tmp_path / f"odd{i}" / "sparsity.safetensors").exists()
        assert dict(describe(tmp_path / "meta"))["sparsity"].startswith("unreadable (optional")
    theirs = sparsity.read_bytes()  # converted in place: a file we could not read is not ours to delete
    result = runner.invoke(app, ["sae", "convert", str(tmp_path / "meta"), "--to", "saelens", "--out",
                                 str(tmp_path / "meta"), "--overwrite"])
    assert result.exit_code == 0 and sparsity.read_bytes() == theirs
    # --overwrite leaves none of the old SAE's files that the new one does not write (they would be read as its)
    (tmp_path / "lens" / "evaluation.json").write_text("{}")  # the old SAE's evaluation (the trainer writes it)
    result = runner.invoke(app, ["sae", "convert", str(tmp_path / "sp"), "--to", "saelens", "--out",
                                 str(tmp_path / "lens"), "--overwrite"])  # lens had a sparsity file; sp has none
    assert result.exit_code == 0 and not (tmp_path / "lens" / "sparsity.safetensors").exists()
    assert not (tmp_path / "lens" / "evaluation.json").exists()
    (tmp_path / "lens" / "evaluation.json").write_text("{}")  # now this SAE's: an in-place conversion keeps it
    result = runner.invoke(app, ["sae", "convert", str(tmp_path / "lens"), "--to", "sparsify", "--out",
                                 str(tmp_path / "lens"), "--overwrite"])  # in place, into the other format
    assert result.exit_code == 0 and sorted(p.name for p in (tmp_path / "lens").iterdir()) == \
        ["cfg.json", "evaluation.json", "sae.safetensors"]
    torch.testing.assert_close(load(tmp_path / "lens")(x), sae(x), rtol=0, atol=0)
    # a hook point with no equivalent here is refused, not written out as "none"
    cfg = json.loads((tmp_path / "meta" / "cfg.json").read_text())
    cfg["metadata"]["hook_name"] = "blocks.1.attn.hook_z"
    (tmp_path / "meta" / "cfg.json").write_text(json.dumps(cfg))
    assert dict(describe(tmp_path / "meta"))["verdict"].startswith("loads with --hook KIND.LAYER to run it in a")
    result = runner.invoke(app, ["sae", "convert", str(tmp_path / "meta"), "--to", "saelens", "--out",
                                 str(tmp_path / "hook_z")])
    assert isinstance(result.exception, UserError) and "(TransformerLens) has no equivalent here: pass --hook " \
        "KIND.LAYER" in str(result.exception) and not (tmp_path / "hook_z").exists()
    result = runner.invoke(app, ["sae", "convert", str(tmp_path / "meta"), "--to", "saelens", "--out",
                                 str(tmp_path / "hook_z"), "--hook", "attn_out.1"])
    assert result.exit_code == 0 and load(tmp_path / "hook_z").cfg.hook_name == "attn_out.1"
    weights = tmp_path / "lens2" / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated: info says why it will not load, exit status 1
    result = runner.invoke(app, ["sae", "info", str(tmp_path / "lens2")])
    assert result.exit_code == 1 and "does not load" in result.output


# --------------------------------------------------------------------------- the hub (a fake server on 127.0.0.1)
@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    pytest.importorskip("huggingface_hub")
    import huggingface_hub.constants as constants
    from fake_hub import FakeHub

    with FakeHub() as hub:
        monkeypatch.setattr(constants, "ENDPOINT", hub.url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                            hub.url + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # conftest sets HF_HUB_OFFLINE=1: the server is local
        monkeypatch.setenv("HF_TOKEN", "hf_fake_token_for_tests")
        yield hub


def test_hub_push_pull_and_load(tmp_path, fake_hub, monkeypatch):
    from llama_sae.sae import hub

    sae, x = make_sae(dtype=torch.float32)
    save(sae, tmp_path / "sae", sparsity=torch.full((96,), -3.0))
    (tmp_path / "sae" / "checkpoint.pt").write_bytes(b"optimizer state")
    assert hub.push(tmp_path / "sae", "org/llama-saes", subdir="resid_post.3") == "hf://org/llama-saes/resid_post.3"
    # the hf:// form pull and load take names the same place
    assert hub.push(tmp_path / "sae", "hf://org/llama-saes/resid_post.3") == "hf://org/llama-saes/resid_post.3"
    with pytest.raises(UserError, match="drop @v1"):
        hub.push(tmp_path / "sae", "hf://org/llama-saes@v1")
    assert set(fake_hub.repos["org/llama-saes"]) == {"resid_post.3/cfg.json", "resid_post.3/sae_weights.safetensors",
                                                     "resid_post.3/sparsity.safetensors"}
    conv = convert("hf://org/llama-saes/resid_post.3", "saelens", tmp_path / "from_hub")  # the download's sparsity
    assert (conv / "sparsity.safetensors").read_bytes() == (tmp_path / "sae" / "sparsity.safetensors").read_bytes()
    back = load("hf://org/llama-saes/resid_post.3")
    torch.testing.assert_close(back(x), sae(x), rtol=0, atol=0)
    result = runner.invoke(app, ["sae", "pull", "hf://org/llama-saes/resid_post.3", str(tmp_path / "pulled")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "pulled" / "sae_weights.safetensors").read_bytes() == \
        (tmp_path / "sae" / "sae_weights.safetensors").read_bytes()
    assert all(r.startswith(("GET", "HEAD", "POST")) for r in fake_hub.requests)
    with pytest.raises(UserError, match="not empty: it holds .*, or pass --overwrite"):
        hub.pull("hf://org/llama-saes/resid_post.3", tmp_path / "pulled")
    with pytest.raises(UserError, match="its SAEs are in resid_post.3; pull hf://org/llama-saes/resid_post.3"):
        hub.pull("hf://org/llama-saes", tmp_path / "top")  # the SAE sits in a folder of the repo
    assert not (tmp_path / "top").exists()
    # the cache serves later loads with the hub offline
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    n = len(fake_hub.requests)
    torch.testing.assert_close(load("hf://org/llama-saes/resid_post.3")(x), sae(x), rtol=0, atol=0)
    assert len(fake_hub.requests) == n
    with pytest.raises(UserError, match="cannot download"):
        load("hf://org/other-repo")


def test_hub_errors(fake_hub, tmp_path, monkeypatch):
    from llama_sae.sae import hub
    from llama_sae.sae.hub import parse_uri

    assert parse_uri("hf://a/b/c/d@v1") == ("a/b", "c/d", "v1")
    for bad in ("hf://only-one", "hf://a b/c", "hf://org/re$po", "hf://org/x--y", "hf://org/x.git", "hf://org/r/l*"):
        with pytest.raises(UserError, match="write hf://org/repo"):
            parse_uri(bad)
    with pytest.raises(UserError, match="no such repo"):
        load("hf://org/missing")
    sae, _ = make_sae(dtype=torch.float32)
    save(sae, tmp_path / "sae")
    for subdir in ("../evil", "/abs", "a/./b"):
        with pytest.raises(UserError, match="--subdir .*: name a folder inside the repo"):
            hub.push(tmp_path / "sae", "org/saes", subdir=subdir)
    truncated = tmp_path / "truncated"
    shutil.copytree(tmp_path / "sae", truncated)
    (truncated / "sae_weights.safetensors").write_bytes((truncated / "sae_weights.safetensors").read_bytes()[:500])
    with pytest.raises(UserError, match="truncated"):
        hub.push(truncated, "org/saes")  # an SAE that does not load is not uploaded
    assert "org/saes" not in fake_hub.repos
    hub.push(tmp_path / "sae", "org/saes")
    fake_hub.refuse["org/saes"] = (403, "GatedRepo")
    with pytest.raises(UserError, match="the repo is gated: accept its conditions"):
        load("hf://org/saes")
    fake_hub.refuse["org/saes"] = (401, "")
    with pytest.raises(UserError, match="HF_TOKEN was refused: set a valid token"):
        load("hf://org/saes")
    del fake_hub.refuse["org/saes"]
    fake_hub.cut.add("org/saes")
    monkeypatch.setenv("HF_HUB_DOWNLOAD_TIMEOUT", "2")
    with pytest.raises(UserError, match="the download was cut off or timed out .*run the same command again"):
        load("hf://org/saes")


def test_hub_pull_overwrite_and_a_repo_of_many_saes(fake_hub, tmp_path):
    """pull --overwrite leaves none of the previous SAE's files to be read as the new one's; a repo of SAEs in
    folders is named folder by folder before any weights are downloaded."""
    from llama_sae.sae import hub

    sae, _ = make_sae(dtype=torch.float32)
    save(sae, tmp_path / "a", sparsity=torch.full((96,), -3.0))
    (tmp_path / "a" / "features").mkdir()
    (tmp_path / "a" / "features" / "features.json").write_text("{}")
    hub.push(tmp_path / "a", "org/one")
    save(sae, tmp_path / "b")
    hub.push(tmp_path / "b", "org/two")
    out = hub.pull("hf://org/one", tmp_path / "pulled")
    assert (out / "sparsity.safetensors").is_file() and (out / "features" / "features.json").is_file()
    hub.pull("hf://org/two", out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    hub.push(tmp_path / "b", "org/one", subdir="resid_post.3")  # the cache then holds another SAE of org/one
    hub.pull("hf://org/one/resid_post.3", tmp_path / "folder")
    again = hub.pull("hf://org/one", tmp_path / "root")
    assert sorted(p.name for p in again.iterdir()) == ["cfg.json", "features", "sae_weights.safetensors",
                                                       "sparsity.safetensors"]
    hub.push(tmp_path / "b", "org/many", subdir="resid_post.3")
    hub.push(tmp_path / "b", "org/many", subdir="layers/attn_out.1")
    fake_hub.requests.clear()
    with pytest.raises(UserError, match=r"its SAEs are in layers/attn_out.1, resid_post.3; pull "
                                        r"hf://org/many/layers/attn_out.1"):
        hub.pull("hf://org/many", tmp_path / "many")
    assert not any("/resolve/" in r for r in fake_hub.requests)  # no file downloaded to say so


@pytest.mark.parametrize("norm", ["layer_norm", "none"])
def test_sae_written_by_saelens_reads_and_agrees(tmp_path, norm):
    sae_lens = pytest.importorskip("sae_lens", reason="sae-lens is not installed: pip install -e '.[dev]'")
    theirs = sae_lens.TopKSAE(sae_lens.TopKSAEConfig(d_in=16, d_sae=64, k=4, normalize_activations=norm))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    theirs.save_model(str(tmp_path))
    ours = load(tmp_path)
    assert (ours.cfg.k, ours.cfg.normalize_activations) == (4, norm)
    x = torch.randn(20, 16, generator=g) * 2 + 1
    feats = theirs.encode(x)
    torch.testing.assert_close(ours.encode(x), feats, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours(x), theirs.decode(feats), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("apply_b_dec", "rescale"), [(False, False), (True, True), (False, True)])
def test_saelens_sae_without_b_dec_input_or_with_decoder_norm_rescaling_reads_exactly(tmp_path, apply_b_dec, rescale):
    """apply_b_dec_to_input=false (b_dec folds into b_enc) and rescale_acts_by_decoder_norm=true (SAELens's
    fold_W_dec_norm, done on reading: rescale is SAELens's TopK training default) load with SAELens's own math."""
    sae_lens = pytest.importorskip("sae_lens", reason="sae-lens is not installed: pip install -e '.[dev]'")
    cfg = sae_lens.TopKSAEConfig(d_in=16, d_sae=64, k=4, normalize_activations="layer_norm",
                                 apply_b_dec_to_input=apply_b_dec, rescale_acts_by_decoder_norm=rescale)
    theirs = sae_lens.TopKSAE(cfg)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    theirs.save_model(str(tmp_path / "theirs"))
    ours = load(tmp_path / "theirs")
    x = torch.randn(40, 16, generator=g) * 2 + 1
    feats = theirs.encode(x)
    torch.testing.assert_close(ours.encode(x), feats, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours(x), theirs.decode(feats), rtol=1e-5, atol=1e-5)
    rows = describe(tmp_path / "theirs")
    notes = " ".join(value for key, value in rows if key == "note")
    assert dict(rows)["verdict"].startswith("loads")
    assert ("apply_b_dec_to_input=false: read with b_enc + W_enc·b_dec" in notes) == (not apply_b_dec)
    assert ("rescale_acts_by_decoder_norm=true: read with the decoder norms folded" in notes) == rescale


def test_foreign_files_that_compute_more_than_topk_are_refused(tmp_path):
    sae, _ = make_sae(dtype=torch.float32)
    save(sae, tmp_path / "ours")
    cfg = json.loads((tmp_path / "ours" / "cfg.json").read_text())
    for key in ("apply_b_dec_to_input", "rescale_acts_by_decoder_norm"):  # a string is not a boolean
        bad = tmp_path / key
        bad.mkdir()
        (bad / "cfg.json").write_text(json.dumps({**cfg, key: "false"}))
        (bad / "sae_weights.safetensors").write_bytes((tmp_path / "ours" / "sae_weights.safetensors").read_bytes())
        with pytest.raises(UserError, match=f"{key} is 'false', not true or false"):
            load(bad)
    extra = tmp_path / "threshold"  # a JumpReLU threshold beside TopK weights
    extra.mkdir()
    (extra / "cfg.json").write_text(json.dumps(cfg))
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "ours" / "sae_weights.safetensors")
    save_file({**tensors, "threshold": torch.zeros(sae.cfg.d_sae)}, extra / "sae_weights.safetensors")
    with pytest.raises(UserError, match=r"holds tensors a TopK SAE does not have \(threshold\)"):
        load(extra)
    assert dict(describe(extra))["verdict"].startswith("does not load: weights: threshold is not part of a TopK SAE")
    plain, _ = make_sae(norm="none", dtype=torch.float32)
    both = tmp_path / "both"  # a sparsify directory with a stray SAELens weights file: its cfg.json decides
    save_sparsify(plain, both)
    (both / "sae_weights.safetensors").write_bytes((tmp_path / "ours" / "sae_weights.safetensors").read_bytes())
    assert torch.equal(load(both).W_enc, plain.W_enc)


def test_an_sae_on_a_hook_with_no_equivalent_and_a_damaged_fold(tmp_path):
    """An SAE on TransformerLens's ln1.hook_normalized: `sae info` says it runs in no model here (exit 1), not
    "pass --hook". A decoder of the wrong shape in a file that needs the decoder-norm fold: the shape error."""
    sae, _ = make_sae(dtype=torch.float32)
    save(sae, tmp_path / "ours")
    cfg = json.loads((tmp_path / "ours" / "cfg.json").read_text())
    weights = (tmp_path / "ours" / "sae_weights.safetensors").read_bytes()
    ln = tmp_path / "ln"
    ln.mkdir()
    (ln / "cfg.json").write_text(json.dumps({**cfg, "metadata": {**cfg["metadata"],
                                                                   "hook_name": "blocks.1.ln1.hook_normalized"}}))
    (ln / "sae_weights.safetensors").write_bytes(weights)
    assert dict(describe(ln))["verdict"].startswith("does not run here: hook point 'blocks.1.ln1.hook_normalized'")
    assert runner.invoke(app, ["sae", "info", str(ln)]).exit_code == 1
    for hook in (None, "attn_in.1"):  # convert, evaluate and the splice refuse it too, --hook or not
        with pytest.raises(UserError, match="no equivalent hook point .*: it cannot run here"):
            load(ln, hook_name=hook)  # convert used to write it with hook_name null, which then "loads"
        with pytest.raises(UserError, match="it cannot run here"):
            convert(ln, "saelens", tmp_path / f"conv{hook}", hook_name=hook)
        assert not (tmp_path / f"conv{hook}").exists()
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "ours" / "sae_weights.safetensors")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "cfg.json").write_text(json.dumps({**cfg, "rescale_acts_by_decoder_norm": True}))
    save_file({**tensors, "W_dec": tensors["W_dec"][:-1]}, bad / "sae_weights.safetensors")
    with pytest.raises(UserError, match=r"W_dec should be \(96, 24\) by its config, found \(95, 24\)"):
        load(bad)
