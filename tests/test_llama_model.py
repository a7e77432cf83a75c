"""Our Llama against transformers' LlamaForCausalLM on the same weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TINY_SHAPES, VOCAB, build_hf_llama

from llama_sae.errors import UserError
from llama_sae.llama import load_model, preset
from llama_sae.llama.checkpoint import (
    hf_to_meta_qk,
    meta_to_hf_qk,
    read_args,
    save_hf,
    save_meta,
)
from llama_sae.llama.model import PRESETS, Transformer, ffn_hidden_dim, rope_inv_freq

SHAPES = list(TINY_SHAPES)


def _tokens(batch=2, length=37, seed=1):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shape", SHAPES)
def test_fp32_logits_match_transformers(hf_checkpoints, shape):
    ref, path = hf_checkpoints[shape]
    ours = load_model(path)
    tokens = _tokens()
    with torch.no_grad():
        expected = ref(tokens).logits
    got = ours(tokens)
    assert expected.abs().max() > 1.0  # the comparison is not between near-zero logits
    assert (got - expected).abs().max().item() <= 1e-4


def test_cached_forward_in_chunks_equals_the_whole_forward(hf_checkpoints):
    """Prefill in chunks of several tokens (start > 0) attends to every cached key before each query."""
    ref, path = hf_checkpoints["gqa-tied-f32"]
    ours = load_model(path)
    tokens = _tokens(batch=2, length=21)
    with torch.no_grad():
        expected = ref(tokens).logits
    cache = ours.new_cache(2, 21)
    got = torch.cat([ours(tokens[:, a:b], start=a, cache=cache) for a, b in ((0, 8), (8, 9), (9, 15), (15, 21))], 1)
    assert (got - expected).abs().max().item() <= 1e-4


def test_bf16_error_no_worse_than_transformers(hf_checkpoints):
    ref32, path = hf_checkpoints["gqa-tied-f32"]
    tokens = _tokens(batch=4, length=64)
    with torch.no_grad():
        truth = ref32(tokens).logits
        ref16 = build_hf_llama("gqa-tied-f32", dtype=torch.bfloat16)
        theirs = ref16(tokens).logits.float()
    ours = load_model(path, dtype="bfloat16")
    assert ours.dtype == torch.bfloat16
    mine = ours(tokens).float()
    their_err = (theirs - truth).abs().mean().item()
    our_err = (mine - truth).abs().mean().item()
    assert our_err <= 1.25 * their_err
    # A random model has many near-ties that any rounding flips: require agreement >= 0.99 where
    # the fp32 top-1 leads by more than 0.1 (about 4x the bf16 error), and no worse than transformers'.
    top2 = truth.topk(2, dim=-1).values
    confident = (top2[..., 0] - top2[..., 1]) > 0.1
    assert confident.float().mean() > 0.5
    agree = mine.argmax(-1) == truth.argmax(-1)
    assert agree[confident].float().mean().item() >= 0.99
    assert agree.float().mean() >= (theirs.argmax(-1) == truth.argmax(-1)).float().mean() - 0.01


def test_hook_points_equal_hidden_states(hf_checkpoints):
    ref, path = hf_checkpoints["gqa-tied-f32"]
    ours = load_model(path)
    tokens = _tokens()
    n = ours.args.n_layers
    with torch.no_grad():
        hs = ref(tokens, output_hidden_states=True).hidden_states
    names = [f"resid_pre.{i}" for i in range(n)] + [f"resid_post.{i}" for i in range(n)]
    got = ours.capture(tokens, names)
    for i in range(n):
        torch.testing.assert_close(got[f"resid_pre.{i}"], hs[i], atol=1e-5, rtol=0)
    for i in range(n - 1):
        torch.testing.assert_close(got[f"resid_post.{i}"], hs[i + 1], atol=1e-5, rtol=0)
    # transformers' last hidden state has the final norm applied; ours does not
    torch.testing.assert_close(ours.norm(got[f"resid_post.{n - 1}"]), hs[n], atol=1e-5, rtol=0)


def test_inner_hook_points_match_transformers_modules(hf_checkpoints):
    ref, path = hf_checkpoints["gqa-untied-mult"]
    ours = load_model(path)
    tokens = _tokens()
    seen = {}
    layer = ref.model.layers[1]

    def keep(kind, pick=lambda o: o):
        def hook(module, inputs, output):
            seen[kind] = pick(output)  # returns None: the module's output is left as it is
        return hook

    handles = [
        layer.input_layernorm.register_forward_hook(keep("attn_in")),
        layer.self_attn.register_forward_hook(keep("attn_out", lambda o: o[0])),
        layer.post_attention_layernorm.register_forward_hook(keep("mlp_in")),
        layer.mlp.register_forward_hook(keep("mlp_out")),
    ]
    with torch.no_grad():
        ref(tokens)
    for h in handles:
        h.remove()
    got = ours.capture(tokens, [f"{k}.1" for k in seen])
    for kind, value in seen.items():
        torch.testing.assert_close(got[f"{kind}.1"], value, atol=1e-5, rtol=0, msg=kind)


def test_capture_stops_after_last_needed_layer(hf_checkpoints):
    _, path = hf_checkpoints["gqa-tied-f32"]
    ours = load_model(path)
    calls = []
    for layer in ours.layers:
        layer.register_forward_pre_hook(lambda m, a: calls.append(m.layer_id))
    ours.capture(_tokens(), ["attn_in.0"])
    assert calls == [0]


def test_edit_replaces_hook_point(hf_checkpoints):
    _, path = hf_checkpoints["gqa-tied-f32"]
    ours = load_model(path)
    tokens = _tokens()
    clean = ours(tokens)
    with ours.hooked({"resid_post.1": lambda x: x}):
        same = ours(tokens)
    with ours.hooked({"resid_post.1": torch.zeros_like}):
        zeroed = ours(tokens)
        seen = ours.capture(tokens, ["resid_post.1"])
    assert torch.equal(clean, same)
    assert not torch.allclose(clean, zeroed)
    assert seen["resid_post.1"].abs().max() == 0  # captures see the edited value
    assert torch.equal(ours(tokens), clean)  # the edit is gone after the block


def test_resumed_forward_equals_the_whole_forward(hf_checkpoints):
    _, path = hf_checkpoints["gqa-tied-f32"]
    ours = load_model(path)
    tokens = _tokens()
    clean = ours(tokens)
    calls = []
    for layer in ours.layers:
        layer.register_forward_pre_hook(lambda m, a: calls.append(m.layer_id))
    for L in range(ours.args.n_layers):
        calls.clear()
        x = ours.residual_before(tokens, L)
        assert calls == list(range(L))  # the prefix stops before block L
        calls.clear()
        assert torch.equal(ours(tokens, resume=(L, x)), clean), L
        assert calls == list(range(L, ours.args.n_layers))  # the resumed run skips blocks 0..L-1
        with ours.hooked({f"attn_in.{L}": torch.zeros_like}):  # an edit inside the first resumed block
            assert torch.equal(ours(tokens, resume=(L, x)), ours(tokens))
    last = ours(tokens, last_only=True)  # generation's prefill: the last position's logits only
    assert last.shape == (tokens.shape[0], 1, ours.args.vocab_size)
    torch.testing.assert_close(last, clean[:, -1:], rtol=0, atol=1e-5)  # the head's GEMM over fewer rows
    with pytest.raises(ValueError, match="resume at block"):
        ours(tokens, resume=(ours.args.n_layers, x))
    with pytest.raises(ValueError, match="resume at block"):
        ours(tokens[:1], resume=(0, x))


def test_meta_checkpoint_two_shards_loads_to_same_logits(hf_checkpoints, tmp_path):
    for shape in ("gqa-tied-f32", "mha-untied-f8"):
        ref, path = hf_checkpoints[shape]
        ours = load_model(path)
        meta_dir = save_meta(ours, tmp_path / shape, shards=2)
        assert sorted(p.name for p in meta_dir.glob("*.pth")) == ["consolidated.00.pth", "consolidated.01.pth"]
        params = json.loads((meta_dir / "params.json").read_text())
        params.pop("rope_scaling_factor")  # Meta's own params.json does not carry it
        params["use_scaled_rope"] = True
        (meta_dir / "params.json").write_text(json.dumps(params))
        factor = TINY_SHAPES[shape]["factor"]
        again = load_model(meta_dir, rope_factor=factor)
        tokens = _tokens()
        assert (again(tokens) - ours(tokens)).abs().max() <= 1e-5
        # read without the weights (`llama-sae info`), the tie is what loading finds: no output.weight means tied
        assert read_args(meta_dir)[1].tie_embeddings == again.args.tie_embeddings == (shape == "gqa-tied-f32")
    (tmp_path / "download" / "original").mkdir(parents=True)  # huggingface-cli ... --include "original/*"
    shutil.copytree(meta_dir, tmp_path / "download" / "original", dirs_exist_ok=True)
    with pytest.raises(UserError, match=r"holds a Meta checkpoint in original/ and no config.json: pass .*original"):
        load_model(tmp_path / "download")


def test_meta_permutation_is_interleaved_pairs():
    n_heads, head_dim, dim = 2, 8, 5
    w = torch.randn(n_heads * head_dim, dim, dtype=torch.float64)
    assert torch.equal(hf_to_meta_qk(meta_to_hf_qk(w, n_heads), n_heads), w)
    # a Meta row pair (2j, 2j+1) of a head becomes rows (j, j + head_dim/2) in rotate-half layout
    hf = meta_to_hf_qk(w, n_heads)
    assert torch.equal(hf[1], w[2]) and torch.equal(hf[head_dim // 2 + 1], w[3])


def test_save_hf_roundtrip_loads_in_transformers(hf_checkpoints, tmp_path):
    from transformers import LlamaForCausalLM

    ref, path = hf_checkpoints["mha-untied-f8"]
    ours = load_model(path)
    out = save_hf(ours, tmp_path / "hf")
    again = LlamaForCausalLM.from_pretrained(out).eval()
    tokens = _tokens()
    with torch.no_grad():
        assert (again(tokens).logits - ref(tokens).logits).abs().max() <= 1e-5


def test_save_hf_writes_shards_with_an_index_and_removes_stale_weight_files(hf_checkpoints, tmp_path):
    """Weights over max_shard_bytes go to model-0000i-of-0000N.safetensors files listed in the index (as
    transformers writes them); transformers and our loader both read them back; saving again as one file
    removes the shards and the index, which a loader would otherwise read instead."""
    from transformers import LlamaForCausalLM

    ref, path = hf_checkpoints["mha-untied-f8"]
    ours = load_model(path)
    out = save_hf(ours, tmp_path / "hf", max_shard_bytes=64 << 10)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(f.name for f in out.glob("*.safetensors"))
    assert len(files) > 2 and sorted(set(index["weight_map"].values())) == files
    assert files[0] == f"model-00001-of-{len(files):05d}.safetensors" and not list(out.glob(".*tmp*"))
    tokens = _tokens()
    with torch.no_grad():
        again = LlamaForCausalLM.from_pretrained(out).eval()
        assert (again(tokens).logits - ref(tokens).logits).abs().max() <= 1e-5
        assert torch.equal(load_model(out)(tokens), ours(tokens))
    save_hf(ours, out)  # one file now
    assert sorted(f.name for f in out.glob("*.safetensors")) == ["model.safetensors"]
    assert not (out / "model.safetensors.index.json").exists()
    with torch.no_grad():
        assert torch.equal(load_model(out)(tokens), ours(tokens))


def test_presets_have_published_parameter_counts():
    counts = {"llama-3.2-1b": 1_235_814_400, "llama-3.2-3b": 3_212_749_824, "llama-3.1-8b": 8_030_261_248}
    for name, count in counts.items():
        with torch.device("meta"):
            model = Transformer(preset(name))
        assert sum(p.numel() for p in model.parameters()) == count
    assert set(PRESETS) >= {"llama-3.1-70b", "llama-3.3-70b"}
    assert ffn_hidden_dim(4096, 1024, 1.3) == 14336


def test_llama3_rope_scaling_against_float64_formula():
    args = preset("llama-3.2-1b")
    got = rope_inv_freq(args).double()
    hd = args.head_dim
    base = 1.0 / (500000.0 ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    expected = []
    for f in base.tolist():
        w = 2 * torch.pi / f
        if w < 8192 / 4:
            expected.append(f)
        elif w > 8192 / 1:
            expected.append(f / 32)
        else:
            s = (8192 / w - 1) / (4 - 1)
            expected.append((1 - s) * f / 32 + s * f)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=0)


def test_bad_inputs_give_one_line_errors(hf_checkpoints, tmp_path):
    _, path = hf_checkpoints["gqa-tied-f32"]
    with pytest.raises(UserError, match="does not exist"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="neither config.json"):
        load_model(tmp_path / "empty")
    with pytest.raises(UserError, match="dtype 'int8' is not supported"):
        load_model(path, dtype="int8")
    # a config that does not fit the weights
    bad = tmp_path / "bad"
    bad.mkdir()
    cfg = json.loads((path / "config.json").read_text())
    cfg["intermediate_size"] = 100
    (bad / "config.json").write_text(json.dumps(cfg))
    (bad / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes())
    with pytest.raises(UserError, match="do not fit the config"):
        load_model(bad)
    # a truncated weights file
    (bad / "config.json").write_text((path / "config.json").read_text())
    (bad / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes()[:1000])
    with pytest.raises(UserError, match="re-download"):
        load_model(bad)
    model = load_model(path)
    with pytest.raises(UserError, match="layer 7 is out of range"):
        model.capture(_tokens(), ["resid_post.7"])
    with pytest.raises(UserError, match="unknown hook point"):
        model.capture(_tokens(), ["resid.1"])
    with pytest.raises(UserError, match="write the layer as a plain number, resid_post.1"):  # would never run
        model.capture(_tokens(), ["resid_post.01"])
    with pytest.raises(UserError, match="write the layer as a plain number"), model.hooked({"mlp_out.00": abs}):
        pass
    for err in (UserError("x"),):
        assert "\n" not in str(err)


def test_missing_meta_shards_and_a_bad_rope_factor_are_named(tmp_path):
    from llama_sae import tinyworld
    from llama_sae.llama.checkpoint import save_meta

    model = load_model(tinyworld.model_path(), dtype="float32")
    save_meta(model, tmp_path / "two", shards=2)
    (tmp_path / "two" / "consolidated.01.pth").unlink()  # the last slice: only the shapes can tell
    with pytest.raises(UserError, match="2-way model-parallel slice: are consolidated.NN.pth shards missing"):
        load_model(tmp_path / "two")
    save_meta(model, tmp_path / "four", shards=4)
    (tmp_path / "four" / "consolidated.01.pth").unlink()
    with pytest.raises(UserError, match="shard consolidated.01.pth is missing"):
        load_model(tmp_path / "four")
    with pytest.raises(UserError, match="factor must be positive"):
        load_model(tmp_path / "four", rope_factor=-1.0)
    with pytest.raises(UserError, match="3 shards do not divide n_heads x head_dim 256, n_kv_heads x head_dim 128"):
        save_meta(model, tmp_path / "three", shards=3)  # refused before writing what it could not read back
    assert not (tmp_path / "three").exists()


def test_damaged_checkpoints_and_wrong_convert_sources_are_one_line(tmp_path):
    """Each used to end in "please report it", load silently, or leave a convert half-written."""
    from llama_sae import tinyworld
    from llama_sae.llama.checkpoint import convert_meta_to_hf, save_meta

    model = load_model(tinyworld.model_path(), dtype="float32")
    hf = tmp_path / "hf"
    shutil.copytree(tinyworld.model_path(), hf)
    (hf / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(UserError, match="has no weight_map of tensor names to shard files"):
        load_model(hf)
    (hf / "model.safetensors.index.json").unlink()
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**config, "rope_scaling": {
        "rope_type": "llama3", "factor": 0.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}}))
    with pytest.raises(UserError, match="factor"):  # loaded before, with NaN frequencies
        load_model(hf)
    (hf / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="it is a Hugging Face checkpoint already"):
        convert_meta_to_hf(hf, tmp_path / "conv_hf")
    meta = save_meta(model, tmp_path / "meta", shards=2)
    plain = Path(shutil.copytree(meta, tmp_path / "plain_rope"))
    params = json.loads((plain / "params.json").read_text())
    (plain / "params.json").write_text(json.dumps({**params, "use_scaled_rope": False}))
    with pytest.raises(UserError, match="does not use scaled RoPE"):  # the factor used to be dropped silently
        convert_meta_to_hf(plain, tmp_path / "conv_rope", rope_factor=32.0)
    good = torch.load(meta / "consolidated.01.pth", weights_only=True)
    for name, shard, message in [
        ("tensor", torch.ones(3), "holds a Tensor"),
        ("float", {**good, "norm.weight": 1.0}, "its 'norm.weight' is a float"),
        ("other_dim", {**good, "layers.0.feed_forward.w1.weight": torch.zeros(
            good["layers.0.feed_forward.w1.weight"].shape[0], model.args.dim + 1)}, "do not make the shape"),
    ]:
        bad = Path(shutil.copytree(meta, tmp_path / name))
        torch.save(shard, bad / "consolidated.01.pth")
        with pytest.raises(UserError, match=message):
            load_model(bad)
    bad_tok = Path(shutil.copytree(meta, tmp_path / "bad_tok"))
    (bad_tok / "tokenizer.model").write_bytes(b"\x0a\x05not a tiktoken file")
    for stale in bad_tok.glob("tokenizer.json"):
        stale.unlink()
    with pytest.raises(UserError):
        convert_meta_to_hf(bad_tok, tmp_path / "conv_tok")
    assert not (tmp_path / "conv_tok" / "config.json").exists()  # nothing that loads, half-written
    assert not (tmp_path / "conv_tok" / "model.safetensors").exists()
    convert_meta_to_hf(meta, tmp_path / "conv")  # a good output, then another convert over it stops midway:
    with pytest.raises(UserError):
        convert_meta_to_hf(bad_tok, tmp_path / "conv")
    assert not (tmp_path / "conv" / "config.json").exists()  # the old config would have loaded the new weights
    from typer.testing import CliRunner

    from llama_sae.cli import app
    from llama_sae.fileio import lock_output

    with lock_output(tmp_path / "conv2", "the converted checkpoint"):  # two converts into one directory
        result = CliRunner().invoke(app, ["convert", str(meta), str(tmp_path / "conv2")])
    assert isinstance(result.exception, UserError) and "another run is using" in str(result.exception)


def test_what_meta_params_cannot_state_is_refused_not_lost(tmp_path):
    """Meta's params.json has no head_dim and no llama3 RoPE sub-parameters: save_meta refuses such models (a
    round trip used to load silently wrong), and a 2-D tensor whole in every shard is refused at load."""
    from llama_sae.llama.checkpoint import save_meta
    from llama_sae.llama.model import ModelArgs, RopeScaling, Transformer

    base = dict(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=32)
    for extra, message in [({"head_dim": 32}, "head_dim 32 is not dim / n_heads = 16"),
                           ({"rope_scaling": RopeScaling(factor=8, original_max_position_embeddings=64)},
                            "Meta's params.json states only the factor")]:
        with pytest.raises(UserError, match=message):
            save_meta(Transformer(ModelArgs(**base, **extra)), tmp_path / "m", shards=2)
    save_meta(Transformer(ModelArgs(**base)), tmp_path / "ok", shards=2)
    whole = torch.load(tmp_path / "ok" / "consolidated.00.pth", weights_only=True)
    whole["layers.0.attention.wq.weight"] = torch.zeros(64, 64)  # the whole matrix in each shard
    for rank in (0, 1):
        torch.save(whole, tmp_path / "ok" / f"consolidated.0{rank}.pth")
    with pytest.raises(UserError, match="holds the whole \\(64, 64\\) matrix"):
        load_model(tmp_path / "ok")


def test_hf_config_fields_llama_3_lacks_are_refused_and_defaults_follow_transformers(hf_checkpoints, tmp_path):
    import json
    import shutil

    _, path = hf_checkpoints["gqa-tied-f32"]
    for name, edit in [("gelu", {"hidden_act": "gelu"})]:
        shutil.copytree(path, tmp_path / name)
        cfg = json.loads((tmp_path / name / "config.json").read_text())
        (tmp_path / name / "config.json").write_text(json.dumps({**cfg, **edit}))
        with pytest.raises(UserError, match="hidden_act='gelu': Llama 3's MLP is SwiGLU"):
            load_model(tmp_path / name)
    from llama_sae.llama.checkpoint import args_from_hf_config

    cfg = json.loads((path / "config.json").read_text())
    for key in ("rope_theta", "rope_parameters", "rope_scaling"):
        cfg.pop(key, None)
    assert args_from_hf_config(cfg).rope_theta == 10000.0  # what transformers assumes when it is absent


def test_a_sweep_lists_each_value_once():
    from llama_sae.sae.train import parse_int_list

    assert parse_int_list("8,16") == [8, 16] and parse_int_list("32") == 32
    for bad in ("8,8", "8,,16"):
        with pytest.raises(UserError):
            parse_int_list(bad)
