"""Damaged or hand-edited inputs across the CLI: each is a one-line error naming the file and the field or line,
never a traceback, and nothing is written over. Built from copies of the shipped tiny model, SAE and artifact."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from llama_sae import tinyworld
from llama_sae.cli import app
from llama_sae.errors import UserError

runner = CliRunner()


def _error(args: list[str]) -> str:
    """The UserError message of a CLI run that must fail with one."""
    result = runner.invoke(app, args)
    assert isinstance(result.exception, UserError), (args, result.output, result.exception)
    return str(result.exception)


def _edit_json(path, change) -> None:
    data = json.loads(path.read_text())
    data = change(data) or data
    path.write_text(json.dumps(data))


@pytest.fixture(scope="module")
def model_copy(tmp_path_factory):
    path = tmp_path_factory.mktemp("bad") / "model"
    shutil.copytree(tinyworld.model_path(), path)
    return path


def test_checkpoint_configs_of_the_wrong_shape_or_values(tmp_path, model_copy):
    bad = tmp_path / "list"
    shutil.copytree(model_copy, bad)
    (bad / "config.json").write_text("[1, 2]")
    assert "config.json holds a JSON list, not an object of settings" in _error(["info", "-m", str(bad)])
    meta = tmp_path / "meta"
    meta.mkdir()
    (meta / "params.json").write_text("[3]")
    assert "params.json holds a JSON list" in _error(["convert", str(meta), str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
    for layers, message in ((-1, "n_layers: Input should be greater than 0"),
                            (4, "tensor(s) the config does not use, first 'layers.4.")):  # 6 layers of weights
        edited = tmp_path / f"layers{layers}"
        shutil.copytree(model_copy, edited)
        _edit_json(edited / "config.json", lambda c, n=layers: c.update(num_hidden_layers=n))
        assert message in _error(["generate", "-m", str(edited), "-n", "2", "hello"])
    typed = tmp_path / "typed"
    shutil.copytree(model_copy, typed)
    _edit_json(typed / "config.json", lambda c: c.update(hidden_size="wide"))
    msg = _error(["info", "-m", str(typed)])
    assert "not a valid Llama 3 config (dim: " in msg and "\n" not in msg


def test_damaged_features_artifacts_name_the_file_and_line(tmp_path):
    for name, change, message in [
        ("list", lambda p: (p / "features.json").write_text("[]"), "features.json: d_sae is missing or of the wrong"),
        ("typed", lambda p: _edit_json(p / "features.json", lambda m: m.update(d_sae="big")), "d_sae is missing"),
        ("latent", lambda p: p.joinpath("explanations.jsonl").open("a").write('{"latent": "x", "explanation": "y"}\n'),
         "explanations.jsonl, record 1024: latent 'x' is not a latent of this SAE (0..1023)"),
        ("garbage", lambda p: p.joinpath("explanations.jsonl").open("a").write("garbage{\n"),
         "explanations.jsonl, line 1024: not a JSON object ('garbage{')"),
    ]:
        feats = tmp_path / name
        shutil.copytree(tinyworld.features_path(), feats)
        change(feats)
        before = {p.name: p.read_bytes() for p in feats.iterdir()}
        for args in (["score", str(feats), "--backend", "offline"], ["search", str(feats), "court"]):
            assert message in _error(args), (name, args)
        assert {p.name: p.read_bytes() for p in feats.iterdir()} == before  # nothing rewritten or dropped


def test_a_file_of_an_artifact_names_it_and_unused_options_are_said(tmp_path):
    from llama_sae.features import load_features

    meta = tinyworld.features_path() / "features.json"
    assert load_features(meta).path == tinyworld.features_path()
    feats = tmp_path / "feats"
    shutil.copytree(tinyworld.features_path(), feats)
    result = runner.invoke(app, ["explain", str(feats), "--latents", "3", "--backend", "offline", "--base-url",
                                 "http://127.0.0.1:9/v1"])
    assert result.exit_code == 0 and "the offline backend sends nothing anywhere: --base-url is not used" in \
        " ".join(result.output.split())


def test_damaged_store_manifests_name_the_field(tmp_path):
    store = tmp_path / "store"
    result = runner.invoke(app, ["capture", "--corpus", "tinyworld:60", "--hook", "resid_post.5", "--tokens", "600",
                                 "--out", str(store), "--no-progress"])
    assert result.exit_code == 0, result.output
    for name, change, message in [
        ("d", lambda m: m.update(d="256"), "d is '256', not what llama-sae capture writes"),
        ("hooks", lambda m: m.update(hooks="resid_post.5"), "hooks is 'resid_post.5'"),
        ("rows", lambda m: m["shards"][0].update(rows=-5), "shards is"),
    ]:
        copy = tmp_path / name
        shutil.copytree(store, copy)
        _edit_json(copy / "manifest.json", change)
        for args in (["store", "info", str(copy)], ["train", "--store", str(copy), "--out", str(tmp_path / "o"),
                                                    "--d-sae", "64", "--k", "4", "--tokens", "512"]):
            msg = _error(args)
            assert message in msg and "the store is damaged; capture it again" in msg, (name, args)
    assert not (tmp_path / "o").exists()
    flipped = tmp_path / "flipped"  # a shard changed at its size: train checks the sha256 before using it
    shutil.copytree(store, flipped)
    shard = next(flipped.glob("*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-3] ^= 4
    shard.write_bytes(bytes(data))
    msg = _error(["train", "--store", str(flipped), "--out", str(tmp_path / "o"), "--d-sae", "64", "--k", "4",
                  "--tokens", "512", "--batch-size", "64"])
    assert f"shard {shard.name} of store {flipped} does not match its checksum" in msg and "--repair" in msg
    info = " ".join(runner.invoke(app, ["store", "info", str(store)]).output.replace("│", " ").split())
    assert "shard files all there at their sizes" in info
    missing = tmp_path / "missing"
    shutil.copytree(store, missing)
    next(missing.glob("*.safetensors")).unlink()
    info = " ".join(runner.invoke(app, ["store", "info", str(missing)]).output.replace("│", " ").split())
    assert "1 missing or of the wrong size, first rank00-" in info and "run `llama-sae store verify`" in info


def test_records_and_prompt_files(tmp_path):
    victim = tmp_path / "notes.json"
    victim.write_text('{"precious": 1}')
    assert "exists and is not a steering record: it is not overwritten" in _error(
        ["generate", "-n", "2", "--steer", "969:add:2", "--record", str(victim), "hello"])
    assert victim.read_text() == '{"precious": 1}'
    assert f"{victim} is a file, not a directory" in _error(
        ["generate", "-n", "2", "--steer", "969:add:2", "--record", str(victim / "r.json"), "hello"])
    rec = tmp_path / "rec.json"
    for _ in range(2):  # an earlier record of the same command is replaced
        assert runner.invoke(app, ["generate", "-n", "2", "--steer", "969:add:2", "--record", str(rec), "hi"]
                             ).exit_code == 0
    _edit_json(rec, lambda r: r["sampling"].update(max_new_tokens="x"))
    assert "the record's 'sampling' is not what llama-sae writes there" in _error(["generate", "--replay", str(rec)])
    for bad in ({"max_new_tokens": 2, "temperature": -5}, {"temperature": 1.0, "top_p": float("nan")},
                {"top_p": 0.9, "seed": 2**64}):
        _edit_json(rec, lambda r, bad=bad: r["sampling"].update(bad))  # values the CLI refuses: replayed before
        assert "the record's 'sampling' is not what llama-sae writes" in _error(["generate", "--replay", str(rec)])
    _edit_json(rec, lambda r: r["sampling"].update(max_new_tokens=2) or r.update(prompts=[]))
    assert "the record's 'prompts' is not what llama-sae writes there" in _error(["generate", "--replay", str(rec)])
    binary = tmp_path / "prompts.bin"
    binary.write_bytes(bytes(range(128, 256)))
    assert "is not UTF-8 text: pass a text file, one prompt per line" in _error(
        ["generate", "--prompts-file", str(binary)])


def test_runs_refuse_an_unrelated_non_empty_directory(tmp_path, model_copy):
    victim = tmp_path / "victim"
    shutil.copytree(model_copy, victim)
    before = sorted(p.name for p in victim.iterdir())
    assert "which is not part of a tinyworld training run" in _error(
        ["tinyworld", "train", "--out", str(victim), "--steps", "1", "--no-evaluate"])
    assert "which is not part of the demo's files" in _error(["demo", "--out", str(victim)])
    assert sorted(p.name for p in victim.iterdir()) == before


def test_an_unforeseen_error_is_one_line_and_the_traceback_comes_on_request(tmp_path):
    """The console script turns an exception no check foresaw into one line (exit 1); LLAMA_SAE_TRACEBACK=1
    shows the traceback. Forced here with a sitecustomize that breaks `llama-sae info`."""
    (tmp_path / "sitecustomize.py").write_text(
        "import llama_sae.llama.checkpoint as c\n"
        "def broken(*a, **k):\n    raise RuntimeError('something nobody checked')\n"
        "c.read_args = broken\n")
    env = {"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    code = "from llama_sae.cli import main; main()"
    one = subprocess.run([sys.executable, "-c", code, "info"], capture_output=True, text=True, env=env, timeout=120)
    assert one.returncode == 1 and "Traceback" not in one.stderr
    assert one.stderr.strip().splitlines() == [
        "error: RuntimeError: something nobody checked (an input llama-sae does not check, or a bug; "
        "LLAMA_SAE_TRACEBACK=1 shows where: please report it)"]
    full = subprocess.run([sys.executable, "-c", code, "info"], capture_output=True, text=True, timeout=120,
                          env={**env, "LLAMA_SAE_TRACEBACK": "1"})
    assert full.returncode == 1 and "Traceback" in full.stderr and "something nobody checked" in full.stderr
    (tmp_path / "sitecustomize.py").write_text(  # under torchrun, a rank whose peer exited: no "please report it"
        "import llama_sae.llama.checkpoint as c\n"
        "def gone(*a, **k):\n    raise RuntimeError('[../gloo/transport/tcp/pair.cc:534] Connection closed by peer')\n"
        "c.read_args = gone\n")
    peer = subprocess.run([sys.executable, "-c", code, "info"], capture_output=True, text=True, timeout=120,
                          env={**env, "WORLD_SIZE": "2", "RANK": "1"})
    assert peer.returncode == 1 and peer.stderr.strip().splitlines() == [
        "error: rank 1 stopped: another rank of this torchrun run stopped first (its error is printed beside this one)"]
    alone = subprocess.run([sys.executable, "-c", code, "info"], capture_output=True, text=True, timeout=120, env=env)
    assert "please report it" in alone.stderr  # outside torchrun the same error is the unforeseen kind
    from llama_sae.cli import _peer_gone

    assert not _peer_gone(RuntimeError("[../gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 3000ms"))
    assert not _peer_gone(ConnectionResetError(104, "Connection reset by peer"))  # a network read, not a rank
    (tmp_path / "sitecustomize.py").write_text(  # Ctrl-C: typer exits 130 without a word; main says what it means
        "import llama_sae.llama.checkpoint as c\n"
        "def interrupted(*a, **k):\n    raise KeyboardInterrupt\n"
        "c.read_args = interrupted\n")
    stopped = subprocess.run([sys.executable, "-c", code, "info"], capture_output=True, text=True, env=env,
                             timeout=120)
    assert stopped.returncode == 130 and stopped.stderr.startswith("interrupted (capture, features, explain and "
                                                                   "score resume")


def test_settings_outside_what_the_model_or_a_link_can_take(tmp_path):
    assert "--context 100,000 is longer than the model's 2,048 positions" in _error(
        ["capture", "--corpus", "tinyworld:10", "--hook", "resid_post.2", "--tokens", "100", "--context", "100000",
         "--out", str(tmp_path / "store")])
    assert not (tmp_path / "store").exists()
    assert "--ui-url 'javascript:alert(1)' is not an http(s) address" in _error(
        ["dashboard", "--out", str(tmp_path / "dash"), "--latents", "3", "--ui-url", "javascript:alert(1)"])
    assert not (tmp_path / "dash").exists()


def test_evaluate_checks_where_its_histogram_goes_before_the_work(tmp_path):
    (tmp_path / "r_frequency.png").mkdir()  # the PNG written beside the report: checked first, named as itself
    assert "r_frequency.png is a directory: pass a file path" in _error(
        ["evaluate", "--sae", str(tinyworld.sae_path()), "--corpus", "tinyworld:3", "--out", str(tmp_path / "r.json")])
    assert not (tmp_path / "r.json").exists()


def test_steers_too_strong_for_float32_or_the_models_dtype(tmp_path):
    rec = ["--record", str(tmp_path / "r.json")]
    assert "x the latent's unit 7.59864 is beyond float32's range" in _error(
        ["generate", "-n", "4", "--steer", "969:clamp:1e38", *rec, "The"])  # used to overflow in a fill
    msg = _error(["generate", "-n", "4", "--dtype", "float16", "--steer", "969:add:9000", "--temperature", "1",
                  "--seed", "1", *rec, "The"])  # used to crash in torch.multinomial, or print NaN's argmax
    assert "next-token scores are not finite (NaN or infinity) at new token 1" in msg and "float16" in msg
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("steer", [[], ["--steer", "969:add:2"]])
def test_a_prompt_past_the_context_is_refused_before_it_is_echoed(tmp_path, steer):
    long = " ".join(["the farmer"] * 1100)  # 2,202 tokens
    result = runner.invoke(app, ["generate", "-n", "5", *steer, "--record", str(tmp_path / "r.json"), long])
    assert isinstance(result.exception, UserError) and "exceeds the model's context of 2048" in str(result.exception)
    assert "the farmer the farmer" not in result.output  # streaming used to print the whole prompt first


def test_repair_refuses_to_cut_a_shard_to_fit_an_edited_manifest(tmp_path):
    store = tmp_path / "store"
    args = ["capture", "--corpus", "tinyworld:60", "--hook", "resid_post.5", "--tokens", "600", "--out", str(store),
            "--no-progress"]
    assert runner.invoke(app, args).exit_code == 0

    def fewer(m):  # a shard's rows and the total edited alike: the shard's checksum still matches
        m["shards"][0]["rows"] -= 100
        m["rows"] -= 100
    _edit_json(store / "manifest.json", fewer)
    shard = store / json.loads((store / "manifest.json").read_text())["shards"][0]["name"]
    before = shard.read_bytes()
    msg = _error([*args, "--repair"])  # used to "repair" the shard by cutting 100 real rows
    assert "where the manifest says" in msg and "manifest.json was edited or damaged" in msg
    assert "not an edited manifest" in msg and shard.read_bytes() == before


def test_the_estimate_note_comes_only_once_the_steers_pass(tmp_path):
    from llama_sae.sae.model import SAE, SAEConfig

    other = tmp_path / "other"  # an SAE at another hook, with no features artifact: its units are estimated
    SAE(SAEConfig(d_in=256, d_sae=64, k=4, hook_name="resid_post.2")).save(other)
    two = ["--sae", str(tinyworld.sae_path()), "--sae", str(other), "--record", str(tmp_path / "r.json")]
    result = runner.invoke(app, ["generate", "-n", "2", *two, "--steer", "969:add:4", "The"])
    assert isinstance(result.exception, UserError) and "does not say which SAE" in str(result.exception)
    assert "estimating" not in result.output  # the note used to come before the error
    result = runner.invoke(app, ["generate", "-n", "2", *two, "--steer", "resid_post.2@3:add:4", "The"])
    assert result.exit_code == 0 and "no features artifact for resid_post.2: estimating" in " ".join(
        result.output.split())


def test_a_stream_cut_by_an_error_ends_its_line():
    import io
    from types import SimpleNamespace

    from rich.console import Console

    from llama_sae.terminal import print_stream

    def chunks():
        yield SimpleNamespace(text=" cat sat")
        raise UserError("boom")

    out = io.StringIO()
    with pytest.raises(UserError, match="boom"):
        print_stream(Console(file=out, width=80), "The", chunks())
    assert out.getvalue() == "The cat sat\n"  # the CLI's error line then starts a line of its own

    def refused():
        raise UserError("early")
        yield

    out = io.StringIO()
    with pytest.raises(UserError, match="early"):
        print_stream(Console(file=out, width=80), "The", refused())
    assert out.getvalue() == ""  # refused before the first chunk: the prompt is not echoed
