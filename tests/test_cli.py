"""The command line: help lists the stages, errors are one line, convert writes what transformers loads."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_tokenizer import meta_tokenizer_model_path
from typer.testing import CliRunner

from llama_sae import tinyworld
from llama_sae.cli import app
from llama_sae.llama import load_model
from llama_sae.llama.checkpoint import save_meta

runner = CliRunner()


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llama_sae.cli", *args], capture_output=True, text=True,
                          timeout=120)


def test_help_lists_every_stage():
    out = runner.invoke(app, ["--help"]).output
    for stage in ("info", "generate", "chat", "convert", "demo"):
        assert stage in out


def test_every_command_renders_its_help():
    import typer.main

    def paths(group, prefix=()):  # every command of the app, sub-apps included
        for name, cmd in group.commands.items():
            yield (*prefix, name)
            if hasattr(cmd, "commands"):
                yield from paths(cmd, (*prefix, name))

    commands = list(paths(typer.main.get_command(app)))
    assert ("sae", "info") in commands and ("evaluate",) in commands
    for path in commands:  # option texts are rich markup: a stray "[/x]" fails only when help is shown
        result = runner.invoke(app, [*path, "--help"])
        assert result.exit_code == 0 and "Usage" in result.output, (path, result.exception)


def test_help_names_values_plainly_and_keeps_long_specs_readable():
    out = runner.invoke(app, ["generate", "--help"], env={"COLUMNS": "100"}).output
    assert "<bool>" not in out and "<list" not in out and "<int" not in out  # typer 0.16+'s annotation names
    assert "SPEC" in out and "INTEGER [x>=1]" in out and "PATH" in out
    assert "prompt+N" in out and "…" not in out  # the steer syntax wraps instead of being cut
    listing = runner.invoke(app, ["--help"], env={"COLUMNS": "200"}).output
    assert "evaluate" in listing and not [line for line in listing.splitlines() if re.match(r"│\s{4,}\S", line)]
    # (no command's summary breaks onto a second line: the first docstring paragraph is one line)


def test_info_shows_shape(hf_checkpoints):
    _, path = hf_checkpoints["gqa-tied-f32"]
    result = runner.invoke(app, ["info", "--model", str(path)])
    assert result.exit_code == 0, result.output
    assert "Hugging Face" in result.output and "2 / 2" not in result.output and "4 / 2" in result.output


def test_user_errors_are_one_line_with_status_2(tmp_path):
    proc = _cli("info", "--model", str(tmp_path / "missing"))
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "does not exist" in lines[0]
    assert "Traceback" not in proc.stderr


def test_a_device_torch_cannot_use_is_a_one_line_error(tmp_path):
    from llama_sae.errors import UserError, check_device

    assert check_device("cpu") == "cpu"
    with pytest.raises(UserError, match="unknown device 'gpu': use cpu, cuda or cuda:N"):
        check_device("gpu")
    for name in ("xpu", "meta", "hip"):  # torch parses these; nothing here runs on them
        with pytest.raises(UserError, match=f"device '{name}' is not supported"):
            check_device(name)
    if not torch.cuda.is_available():  # the machines tests run on; with a GPU, asks for one it lacks
        with pytest.raises(UserError, match="sees no CUDA GPU; use --device cpu"):
            check_device("cuda")
    else:
        with pytest.raises(UserError, match="CUDA GPU"):
            check_device(f"cuda:{torch.cuda.device_count()}")
    for args in (["generate", "hi", "--device", "gpu"], ["evaluate", "--sae", "x", "--corpus", "tinyworld:2",
                                                          "--device", "gpu"],
                 ["demo", "--device", "gpu", "--out", str(tmp_path / "demo")],
                 ["explain", str(shutil.copytree(tinyworld.features_path(), tmp_path / "f")), "--device", "gpu"]
                 ):  # explain's offline backend runs no model, and checks --device all the same
        result = runner.invoke(app, args)
        assert isinstance(result.exception, UserError) and "unknown device 'gpu'" in str(result.exception), args


def test_convert_meta_to_hf_loads_in_transformers(hf_checkpoints, tmp_path):
    from transformers import AutoModelForCausalLM

    ref, path = hf_checkpoints["mha-untied-f8"]
    meta = save_meta(load_model(path), tmp_path / "meta", shards=2)
    shutil.copy(meta_tokenizer_model_path(), meta / "tokenizer.model")
    result = runner.invoke(app, ["convert", str(meta), str(tmp_path / "hf"), "--rope-factor", "8"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "hf" / "tokenizer.json").exists()
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokens = torch.randint(0, 512, (2, 19), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (again(tokens).logits - ref(tokens).logits).abs().max() <= 1e-5
    # converting again into a non-empty directory is refused, and nothing is overwritten
    proc = _cli("convert", str(meta), str(tmp_path / "hf"))
    assert proc.returncode == 2 and "not empty: it holds config.json: choose an empty or new directory for a " \
        "Hugging Face checkpoint, or pass --overwrite" in " ".join(proc.stderr.split())
    (meta / "tokenizer.model").unlink()  # a source without its tokenizer: converted, with a note that says so
    result = runner.invoke(app, ["convert", str(meta), str(tmp_path / "hf2"), "--rope-factor", "8"])
    assert result.exit_code == 0 and "has no tokenizer.model" in " ".join(result.output.split())


def test_pipeline_capture_store_train_evaluate(tmp_path):
    """The CLI stages chain on the shipped tiny model: capture -> store info/verify -> train -> evaluate."""
    store, sae = tmp_path / "store", tmp_path / "sae"
    steps = [
        ["capture", "--corpus", "tinyworld:800", "--hook", "resid_post.2", "--tokens", "6000", "--out", str(store),
         "--no-progress"],
        ["store", "info", str(store)],
        ["store", "verify", str(store)],
        ["train", "--store", str(store), "--out", str(sae), "--d-sae", "256", "--k", "8", "--batch-size", "512",
         "--tokens", "8192", "--eval-every", "8", "--eval-corpus", "tinyworld:8:heldout"],  # in the store's model
        ["evaluate", "--sae", str(sae), "--store", str(store), "--corpus", "tinyworld:20:heldout", "--out",
         str(tmp_path / "report.json")],
    ]
    for args in steps:
        result = runner.invoke(app, args)
        assert result.exit_code == 0, (args, result.output)
    assert "ok:" in runner.invoke(app, ["store", "verify", str(store)]).output
    report = json.loads((tmp_path / "report.json").read_text())
    assert 0 < report["fvu"] < 1 and report["l0"] <= 8 and report["ce_zero_ablated"] > report["ce_clean"]
    assert report["inputs"] == {"sae": str(sae), "k": 8, "hook": report["inputs"]["hook"], "store": str(store),
                                "corpus": "tinyworld:20:heldout", "model": str(tinyworld.model_path()), "texts": 20}
    assert (sae / "cfg.json").exists() and (sae / "sae_weights.safetensors").exists()
    final = json.loads(next(sae.rglob("evaluation.json")).read_text())  # spliced into the store's model
    assert final["ce_zero_ablated"] > final["ce_spliced"] > final["ce_clean"] > 0
    # the SAE remembers the checkpoint its activations came from; evaluate says when a store's differs
    cfg = json.loads((sae / "cfg.json").read_text())
    manifest = json.loads((store / "manifest.json").read_text())
    assert cfg["metadata"]["model_fingerprint"] == manifest["model"]["fingerprint"]
    cfg["metadata"]["model_fingerprint"] = "0" * 64
    (sae / "cfg.json").write_text(json.dumps(cfg))
    other = runner.invoke(app, ["evaluate", "--sae", str(sae), "--store", str(store)])
    assert other.exit_code == 0 and "trained on activations of another checkpoint (fingerprint 0000000000000000)" \
        in " ".join(other.output.split())


@pytest.mark.parametrize("args, option", [
    (["evaluate", "--sae", "x", "--corpus", "c", "--n-texts", "0"], "--n-texts"),
    (["features", "--sae", "x", "--out", "y", "--top-n", "0"], "--top-n"),
    (["features", "--sae", "x", "--out", "y", "--max-tokens", "1"], "--max-tokens"),
    (["generate", "hi", "-n", "-1"], "-n"),
    (["generate", "hi", "--top-p", "2"], "--top-p"),
    (["generate", "hi", "--temperature", "-1"], "--temperature"),
    (["ui", "--port", "70000"], "--port"),
    (["capture", "--out", "y", "--val-percent", "100"], "--val-percent"),
    (["explain", "x", "--n-top", "0"], "--n-top"),
    (["score", "x", "--n", "0"], "--n"),
])
def test_numbers_out_of_range_are_usage_errors(args, option):
    """Counts and sizes that make no sense stop before any work, naming the option (click's usage error, status 2)."""
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and option in result.output and "Traceback" not in result.output


def test_bad_paths_and_values_are_one_line_errors(tmp_path):
    from llama_sae.errors import UserError

    (tmp_path / "f").write_text("not a directory")
    cases = [
        (["evaluate", "--sae", "x", "--corpus", "c", "--out", str(tmp_path)], "is a directory"),
        (["evaluate", "--sae", "x", "--corpus", "c", "--out", str(tmp_path / "no" / "r.json")], "does not exist"),
        (["generate", "--prompts-file", str(tmp_path)], "not a file"),
        (["generate", "--replay", str(tmp_path)], "not a file"),
        (["generate", "hi", "--replay", str(tmp_path / "f")], "drop the PROMPT"),
        (["generate", "hi", "--record", str(tmp_path)], "is a directory"),
        (["sae", "convert", "x", "--to", "saelens", "--out", str(tmp_path / "f")], "is a file"),
        (["dashboard", "--out", str(tmp_path / "f")], "is a file"),
    ]
    for args, message in cases:
        result = runner.invoke(app, args)
        assert isinstance(result.exception, UserError) and message in str(result.exception), (args, result.output)


def test_explain_arguments_are_checked(tmp_path):
    from llama_sae import tinyworld
    from llama_sae.errors import UserError

    features = str(tinyworld.features_path())
    for command, args, message in (("explain", ["--latents", "abc"], "write ids and ranges like 3,17,40-49"),
                                   ("explain", ["--retry-failed", "--fresh"], "pass one of them"),
                                   ("score", ["--retry-failed", "--fresh"], "pass one of them"),
                                   # a bad value is named before any backend is made (which could ask for a key)
                                   ("score", ["--sample", "bogus", "--backend", "anthropic"], "--sample must be")):
        result = runner.invoke(app, [command, features, *args], env={"ANTHROPIC_API_KEY": ""})
        assert isinstance(result.exception, UserError) and message in str(result.exception), (command, args)


def test_a_run_where_every_request_failed_exits_1(capsys):
    import typer

    from llama_sae.cli_interpret import _fail_if_nothing_came_back

    with pytest.raises(typer.Exit) as e:
        _fail_if_nothing_came_back({"outcomes": {"errored": 2}, "first_error": "errored: Connection error"}, "explain")
    assert e.value.exit_code == 1
    _fail_if_nothing_came_back({"outcomes": {"unanswered": 2}}, "explain")  # submitted with --no-wait: not a failure
    assert "warning" not in capsys.readouterr().err
    _fail_if_nothing_came_back({"outcomes": {"succeeded": 1, "errored": 1}, "first_error": "errored: 400"}, "explain")
    assert "1 explain request(s) failed (first: errored: 400); re-send only those with --retry-failed" in " ".join(
        capsys.readouterr().err.split())


def test_path_errors_no_check_caught_are_one_line(monkeypatch, capsys):
    """The entry point's safety net: an OSError about a path is one line and status 2, not a traceback."""
    import llama_sae.cli as cli

    def write_into_a_directory(**kw):
        raise IsADirectoryError(21, "Is a directory", "/runs/report")

    monkeypatch.setattr(cli, "app", write_into_a_directory)
    with pytest.raises(SystemExit) as e:
        cli.main()
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err == "error: /runs/report is a directory: pass a file path there"


@pytest.mark.parametrize("argv, message", [
    (["generate", "-n", "0"], "error: Invalid value for '--max-new-tokens' / '-n': Input should be greater than or "
                              "equal to 1 (see llama-sae generate --help)"),
    (["info", "--bogus"], "error: No such option: --bogus (see llama-sae info --help)"),
    (["sae", "info"], "error: Missing argument 'SAE'. (see llama-sae sae info --help)"),
    (["generate", "--seed", "9223372036854775808", "x"], "error: Invalid value for '--seed': 9223372036854775808 is "
                                                         "too large: give a number in -2^63..2^63-1 (see llama-sae "
                                                         "generate --help)"),
    (["generate", "--top-p", "nan", "x"], "error: Invalid value for '--top-p': nan is not a number (see llama-sae "
                                          "generate --help)"),
    (["latent", "features", "-1"], "error: -1 was read as an option: numbers given without an option name are 0 or "
                                   "more (a negative value for an option is written --name=-1) (see llama-sae latent "
                                   "--help)"),
])
def test_usage_errors_are_one_line(monkeypatch, capsys, argv, message):
    """A bad option or value through the entry point: one line and status 2, not click's boxed usage screen."""
    import llama_sae.cli as cli

    monkeypatch.setattr("sys.argv", ["llama-sae", *argv])
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 2 and capsys.readouterr().err.strip().replace("\n", " ") == message
    monkeypatch.setattr("sys.argv", ["llama-sae", "sae", "info", "--help"])
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 0 and "Usage: llama-sae sae info" in capsys.readouterr().out


def test_rich_output_keeps_colons_in_user_text():
    """':100:' and ':clamp:' are not emoji codes in what the CLI prints."""
    from llama_sae.cli import console

    with console.capture() as cap:
        console.print("tinyworld:100:train 123:clamp:8")
    assert cap.get().strip() == "tinyworld:100:train 123:clamp:8"


def test_train_takes_token_counts_with_suffixes(tmp_path, monkeypatch):
    """--tokens 20k as capture takes it (the store is checked after: a missing one is the error here)."""
    from llama_sae.errors import UserError

    result = runner.invoke(app, ["train", "--store", str(tmp_path / "none"), "--out", str(tmp_path / "o"),
                                 "--tokens", "20k"])
    assert isinstance(result.exception, UserError) and "tokens" not in str(result.exception)
    result = runner.invoke(app, ["train", "--store", str(tmp_path / "none"), "--out", str(tmp_path / "o"),
                                 "--tokens", "lots"])
    assert isinstance(result.exception, UserError) and "--tokens: bad token count 'lots'" in str(result.exception)
    result = runner.invoke(app, ["train", "--store", str(tmp_path / "none"), "--out", str(tmp_path / "o"),
                                 "--dead-tokens", "0"])
    assert isinstance(result.exception, UserError) and "--dead-tokens: bad token count '0'" in str(result.exception)
    import llama_sae.sae.train as train_mod

    seen = {}

    def fake_train(store, out, cfg):  # what the CLI hands the trainer
        seen["cfg"] = cfg
        return []

    monkeypatch.setattr(train_mod, "train", fake_train)
    result = runner.invoke(app, ["train", "--store", "s", "--out", "o", "--preset", "seed", "--dead-tokens", "10M"])
    assert result.exit_code == 0, result.output
    assert seen["cfg"].dead_tokens_threshold == 10_000_000 and seen["cfg"].k == 64  # the preset, scaled down


def test_train_help_states_the_config_defaults():
    """train's options default to None (they override a preset or --config): the help states TrainConfig's own."""
    import re

    from llama_sae.sae.train import TrainConfig

    text = " ".join(runner.invoke(app, ["train", "--help"], terminal_width=200).output.split())
    text = re.sub(r"[│╭╮╰╯─]", " ", text)
    fields = TrainConfig.model_fields
    for option, field in [("k", "k"), ("batch-size", "batch_size"), ("epochs", "epochs"), ("seed", "seed")]:
        assert f"(default: {fields[field].default})" in " ".join(text.split()), option
    assert f"log_every = {fields['log_every'].default} steps" in " ".join(text.split())
    assert f"(default: {fields['expansion_factor'].default} x d_in)" in " ".join(text.split())


def test_tinyworld_recovery_on_any_sae(tmp_path):
    """`llama-sae tinyworld recovery`: the demo's ground-truth table for a given SAE, and its JSON."""
    from llama_sae import tinyworld
    from llama_sae.errors import UserError

    out = tmp_path / "recovery.json"
    result = runner.invoke(app, ["tinyworld", "recovery", "--sae", str(tinyworld.sae_path()), "--sentences", "1000",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    rec = json.loads(out.read_text())
    assert [r["concept"] for r in rec["rows"]] == [c.name for c in tinyworld.concepts()] and rec["sentences"] == 1000
    assert rec["recovered"] == sum(r["auroc"] >= 0.95 for r in rec["rows"]) / len(rec["rows"])
    assert rec["recovered"] > rec["baseline_recovered"]  # the shipped SAE's latents beat single neurons
    assert f"concepts recovered (AUROC ≥ 0.95): {rec['recovered']:.0%}" in " ".join(result.output.split())
    bad = runner.invoke(app, ["tinyworld", "recovery", "--sae", str(tmp_path / "none")])
    assert isinstance(bad.exception, UserError) and "does not exist" in str(bad.exception)
    few = runner.invoke(app, ["tinyworld", "recovery", "--sae", str(tinyworld.sae_path()), "--sentences", "400",
                              "--out", str(tmp_path / "few.json")])  # too few for the rarest concepts: refused
    assert few.exit_code == 2 and "--sentences" in few.output and not (tmp_path / "few.json").exists()
    from llama_sae.llama import load_model, load_tokenizer
    from llama_sae.sae import load
    from llama_sae.tinyworld.recovery import concept_recovery

    with pytest.raises(UserError, match=r"is in too few .* of the 100 sentences .*\(1,000 or more"):  # no NaN rows
        concept_recovery(load_model(tinyworld.model_path()), load_tokenizer(tinyworld.model_path()),
                         load(tinyworld.sae_path()), n_sentences=100)


def test_latent_and_search_in_the_terminal(tmp_path):
    """`llama-sae latent FEATS ID` and `llama-sae search FEATS TEXT` on the shipped artifact."""
    import shutil

    from llama_sae import tinyworld
    from llama_sae.errors import UserError
    from llama_sae.features import load_features

    feats = tinyworld.features_path()
    f = load_features(feats)
    shown = runner.invoke(app, ["latent", str(feats), "969", "-n", "3"], terminal_width=400)
    assert shown.exit_code == 0, shown.output
    top = f.examples(969, "max", 3)
    text = " ".join(shown.output.split())  # the console wraps long lines
    assert all(" ".join(x.text.split()) in text for x in top) and " ".join(f.explanation(969).text.split()) in text
    peak = max(range(len(top[0].acts)), key=top[0].acts.__getitem__)
    assert f"{top[0].activation:.3f}" in text and f"(peak at {top[0].tokens[peak]!r})" in text
    by_last = runner.invoke(app, ["latent", str(feats), "969", "-n", "2", "--by", "last"], terminal_width=400)
    text = " ".join(by_last.output.split())
    assert "top sentences by last activation" in text
    assert all(" ".join(x.text.split()) in text for x in f.examples(969, "last", 2))
    found = runner.invoke(app, ["search", str(feats), "courthouse", "--limit", "5"], terminal_width=400)
    assert found.exit_code == 0, found.output
    rows = [line.split("│")[1].strip() for line in found.output.splitlines() if line.startswith("│")]
    assert rows and [r for r in rows if r] == [str(i) for i in f.search("courthouse", 5)]
    many = runner.invoke(app, ["search", str(feats), "the tokens", "--limit", "2"])
    assert f"2 of {len(f.search('the tokens', 2000)):,} latent(s) matching" in " ".join(many.output.split())
    closer = runner.invoke(app, ["search", str(feats), "closer [/]"])  # the title is text, not rich markup
    assert closer.exit_code == 0 and "latent(s) matching 'closer [/]'" in " ".join(closer.output.split())
    bad = runner.invoke(app, ["latent", str(feats), "5000"])
    assert isinstance(bad.exception, UserError) and "out of range" in str(bad.exception)
    for blank in ("", "   "):  # used to list the first 20 latents as "matching ''"
        empty = runner.invoke(app, ["search", str(feats), blank])
        assert isinstance(empty.exception, UserError) and "search for a word" in str(empty.exception)
    bare = tmp_path / "bare"
    shutil.copytree(feats, bare, ignore=shutil.ignore_patterns("explanations.jsonl"))
    bad = runner.invoke(app, ["search", str(bare), "court"])
    assert isinstance(bad.exception, UserError) and "run `llama-sae explain" in str(bad.exception)


def test_every_command_the_readme_names_exists():
    """Each `llama-sae CMD [SUB]` the README shows resolves to a command (a lost decorator once dropped one)."""
    import re

    import typer.main

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    root = typer.main.get_command(app)
    named = set(re.findall(r"(?:^|`|\.venv/bin/)llama-sae ((?:[a-z][a-z-]*)(?: [a-z][a-z-]*)?)", readme, re.M))
    assert len(named) > 20
    for words in sorted(named):
        first, *rest = words.split()
        cmd = root.commands.get(first)
        assert cmd is not None, f"`llama-sae {first}` is in the README but is not a command"
        if hasattr(cmd, "commands"):  # a group: its sub-command must exist too
            assert rest and rest[0] in cmd.commands, f"`llama-sae {words}` is in the README but is not a command"
    preview = runner.invoke(app, ["corpus", "preview", "tinyworld:3", "-n", "2"])
    assert preview.exit_code == 0 and "tinyworld" in preview.output
