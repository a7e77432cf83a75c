"""The SAE trainer: schedule, dictionary recovery, dead-latent revival, sweeps, data parallelism (2 ranks = 1
process), exact resume after kill -9, the output directory, bad input, and a real activation store."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from llama_sae.errors import UserError
from llama_sae.sae import load
from llama_sae.sae.train import (
    TensorSource,
    TrainConfig,
    World,
    init_runs_,
    load_config,
    lr_at,
    make_runs,
    read_metrics,
    train_sae,
    train_step,
    validated,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread for small kernels


def dictionary_data(n_tokens: int, d: int = 32, n_atoms: int = 64, active: int = 3, seed: int = 0):
    """x = Σ c_i D_i over `active` random atoms of a unit-norm dictionary D [n_atoms, d], plus a mean and noise."""
    g = torch.Generator().manual_seed(seed)
    D = torch.nn.functional.normalize(torch.randn(n_atoms, d, generator=g), dim=1)
    idx = torch.rand(n_tokens, n_atoms, generator=g).argsort(1)[:, :active]
    codes = torch.zeros(n_tokens, n_atoms).scatter_(1, idx, torch.rand(n_tokens, active, generator=g) + 0.5)
    return codes @ D + 0.01 * torch.randn(n_tokens, d, generator=g) + 2.0, D


def small_cfg(**kw) -> TrainConfig:
    base = dict(d_sae=128, k=4, batch_size=512, tokens=512 * 12, lr=3e-3, normalize_activations="none",
                log_every=4, checkpoint_every=5, dead_tokens_threshold=1024, plots=False)
    return TrainConfig(**{**base, **kw})


def test_lr_schedule_warms_up_then_follows_a_cosine_per_step():
    lrs = [lr_at(s, 100, 1e-3, 1e-4, 0.1) for s in range(100)]
    assert lrs[:10] == pytest.approx([1e-3 * (s + 1) / 10 for s in range(10)])
    assert lrs[10] == pytest.approx(1e-3) and lrs[55] == pytest.approx(5.5e-4)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # no staircase: it falls every step
    assert lrs[-1] == pytest.approx(1e-4, rel=1e-2)


def test_recovers_a_known_sparse_dictionary(tmp_path):
    x, D = dictionary_data(40_000)
    cfg = small_cfg(batch_size=1024, tokens=None, epochs=4, checkpoint_every=1000, log_every=50)
    (path,) = train_sae(TensorSource(x), cfg, tmp_path / "sae", progress=False)
    sae = load(path)
    max_cos = (D @ sae.W_dec.T).max(1).values  # [n_atoms]: best-matching latent per true atom
    assert max_cos.mean() >= 0.95
    assert read_metrics(tmp_path / "sae" / "metrics.jsonl")[-1]["fvu"] < 0.15  # sanity: magnitudes still converge


def _dead_after(aux_coeff: float, steps: int = 80) -> tuple[float, float]:
    """Train with half the latents crippled (encoder rows x0.02: positive but never in the top k)."""
    x, _ = dictionary_data(512 * steps, d=16, n_atoms=32)
    cfg = small_cfg(d_sae=64, k=4, lr=1e-2, aux_coeff=aux_coeff, k_aux=8, tokens=512 * steps)
    runs = make_runs(cfg, 16, {}, torch.device("cpu"))
    init_runs_(runs, x[:512], cfg)
    with torch.no_grad():
        runs[0].sae.W_enc[:32] *= 0.02
    dead_at = []
    for step in range(steps):
        train_step(runs, x[step * 512:(step + 1) * 512], cfg, World(), step, steps, 512)
        dead_at.append(float((runs[0].since_fired >= cfg.dead_tokens_threshold).float().mean()))
    return max(dead_at), dead_at[-1]


def test_dead_latents_revive_with_aux_k_and_stay_dead_without():
    peak, final = _dead_after(aux_coeff=1 / 32)
    assert peak >= 0.4 and final <= 0.2  # 64 latents for 32 atoms: a few may stay idle for good reason
    peak, final = _dead_after(aux_coeff=0.0)
    assert final >= 0.4


def test_sweep_trains_each_sae_as_if_alone(tmp_path):
    x, _ = dictionary_data(512 * 12)
    dirs = train_sae(TensorSource(x), small_cfg(k=[3, 5], d_sae=[64]), tmp_path / "sweep", progress=False)
    assert [p.name for p in dirs] == ["k3_n64", "k5_n64"]
    for k, path in zip([3, 5], dirs):
        (alone,) = train_sae(TensorSource(x), small_cfg(k=k, d_sae=64), tmp_path / f"alone{k}", progress=False)
        assert (path / "sae_weights.safetensors").read_bytes() == (alone / "sae_weights.safetensors").read_bytes()
    names = {r["sae"] for r in read_metrics(tmp_path / "sweep" / "metrics.jsonl")}
    assert names == {"k3_n64", "k5_n64"}


def test_output_directory(tmp_path, capsys):
    x, _ = dictionary_data(512 * 12)
    out = tmp_path / "sae"
    (path,) = train_sae(TensorSource(x, model="tiny", hook="resid_post.3"), small_cfg(plots=True), out, progress=False)
    assert path == out
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["k"] == 4 and cfg["d_sae"] == 128 and cfg["d_in"] == 32
    assert cfg["metadata"]["hook_name"] == "resid_post.3" and cfg["metadata"]["model_name"] == "tiny"
    assert cfg["metadata"]["trained_tokens"] == 512 * 12
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [4, 8, 12]
    assert set(records[0]) == {"step", "tokens", "sae", "loss", "fvu", "aux_loss", "l0", "dead_frac", "lr",
                               "tokens_per_s"}
    assert all(0 < r["l0"] <= 4 for r in records)
    again = load_config(file=out / "train_config.yaml")  # the written config feeds back in
    assert again == small_cfg(plots=True)
    assert (out / "sparsity.safetensors").exists() and (out / "checkpoint.pt").exists()
    try:
        import matplotlib  # noqa: F401

        assert (out / "plots" / "fvu.png").read_bytes()[:4] == b"\x89PNG"
    except ImportError:
        assert "plots skipped: matplotlib is not installed" in capsys.readouterr().out


def test_wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is an optional extra")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    x, _ = dictionary_data(512 * 12)
    train_sae(TensorSource(x), small_cfg(wandb=True), tmp_path / "sae", progress=False)
    assert any((tmp_path / "sae" / "wandb").glob("offline-run-*"))


def test_wandb_that_will_not_start_is_one_line(tmp_path, monkeypatch):
    """No W&B login (wandb raises its own UsageError): one line naming the ways on, no metrics file left."""
    wandb = pytest.importorskip("wandb", reason="wandb is an optional extra")

    def no_key(**kw):
        raise wandb.errors.UsageError("No API key configured. Use `wandb login` to log in.")

    monkeypatch.setattr(wandb, "init", no_key)
    x = torch.randn(512, 16, generator=torch.Generator().manual_seed(0))
    with pytest.raises(UserError, match="--wandb could not start a W&B run \\(UsageError: No API key configured"):
        train_sae(TensorSource(x), small_cfg(wandb=True), tmp_path / "sae", progress=False)
    assert not (tmp_path / "sae" / "metrics.jsonl").exists()


# --------------------------------------------------------------------------- bad input
def test_bad_config_values_are_one_line_errors():
    with pytest.raises(UserError, match=r"training config: lr: Input should be greater than 0 \(got 0\)"):
        validated({"lr": 0})
    with pytest.raises(UserError, match="unknown field 'nonsense': the fields are d_sae, expansion_factor, k, "):
        validated({"nonsense": 1})
    with pytest.raises(UserError, match="unknown preset 'nope': choose one of .*seed"):
        load_config(preset="nope")


@pytest.mark.parametrize("fields, message", [
    ({"betas": [float("nan"), 0.9]}, r"betas must be two numbers in \[0, 1\)"),
    ({"betas": [1.5, -2]}, r"betas must be two numbers in \[0, 1\)"),
    ({"eps": float("inf")}, "eps: Input should be a finite number"),
    ({"aux_coeff": float("inf")}, "aux_coeff: Input should be a finite number"),
    ({"batch_size": 1}, "batch_size: Input should be greater than or equal to 2"),
    ({"k": [16, 16]}, r"k lists a value twice \(\[16, 16\]\): two SAEs would share one name"),
    ({"k": True}, "k: True is not a whole number"),  # YAML's `k: yes` used to train at k=1
    ({"expansion_factor": True}, "expansion_factor: True is not a whole number"),  # d_sae = d_in, quietly
])
def test_optimizer_settings_and_sweeps_that_cannot_work_are_one_line(fields, message):
    with pytest.raises(UserError, match=message):  # each used to end in "please report it", or ran on regardless
        validated(fields)


def test_an_sae_too_large_for_memory_is_one_line(tmp_path):
    x, _ = dictionary_data(2048)
    with pytest.raises(UserError, match=r"an SAE of 100,000,000,000 x 32 does not fit in the memory of cpu"):
        train_sae(TensorSource(x), small_cfg(d_sae=10**11), tmp_path / "out", progress=False)


def test_a_damaged_or_foreign_checkpoint_is_refused_and_hand_edited_metrics_lines_are_skipped(tmp_path):
    x, _ = dictionary_data(512 * 12)
    out = tmp_path / "sae"
    train_sae(TensorSource(x), small_cfg(), out, progress=False)
    good = (out / "checkpoint.pt").read_bytes()
    with open(out / "metrics.jsonl", "a") as f:  # hand edits: each used to stop the resume with a TypeError
        f.write('[1]\n{"x": 1}\n{"step": "a"}\n')
    train_sae(TensorSource(x), small_cfg(plots=True), out, progress=False)  # re-exports, plots included
    assert all(isinstance(r["step"], int) for r in read_metrics(out / "metrics.jsonl"))
    damaged = bytearray(good)
    damaged[len(good) // 2:len(good) // 2 + 64] = bytes(64)  # same size: torch.load alone would read it
    (out / "checkpoint.pt").write_bytes(bytes(damaged))
    with pytest.raises(UserError, match=r"checkpoint .* is damaged \(its entry .* fails its CRC check\)"):
        train_sae(TensorSource(x), small_cfg(), out, progress=False)
    torch.save({"a": 1}, out / "checkpoint.pt")  # a valid torch file, not ours
    with pytest.raises(UserError, match="is not a llama-sae training checkpoint: train into a new --out"):
        train_sae(TensorSource(x), small_cfg(), out, progress=False)
    from torch.utils.serialization import config

    config.save.compute_crc32 = False  # CRCs of 0: nothing to check, not damage
    try:
        torch.save(torch.load(io.BytesIO(good), weights_only=True), out / "checkpoint.pt")
    finally:
        config.save.compute_crc32 = True
    train_sae(TensorSource(x), small_cfg(), out, progress=False)  # resumes (and re-exports)


def test_k_at_least_latents_is_refused_before_anything_is_written(tmp_path):
    x, _ = dictionary_data(2048)
    with pytest.raises(UserError, match="k=64 must be smaller than d_sae=64"):
        train_sae(TensorSource(x), small_cfg(k=64, d_sae=64), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_resume_refuses_another_config_another_width_and_a_foreign_directory(tmp_path):
    x, _ = dictionary_data(512 * 12)
    out = tmp_path / "sae"
    train_sae(TensorSource(x), small_cfg(), out, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(UserError, match=r"another config \(k=4 in the checkpoint, 5 now\)"):
        train_sae(TensorSource(x), small_cfg(k=5), out, progress=False)
    with pytest.raises(UserError, match="the store has width d=16 but checkpoint .* was trained on d=32"):
        train_sae(TensorSource(x[:, :16]), small_cfg(), out, progress=False)
    with pytest.raises(UserError, match=r"trained on other activations \(rows 6144 \(now 5632\)\)"):
        train_sae(TensorSource(x[:512 * 11]), small_cfg(), out, progress=False)  # another store, same width
    with pytest.raises(UserError, match=r"other activations \(hook acts \(now resid_post.1\)\)"):
        train_sae(TensorSource(x, hook="resid_post.1"), small_cfg(), out, progress=False)
    assert before == {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}  # nothing overwritten
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="is not empty and holds no checkpoint.pt"):
        train_sae(TensorSource(x), small_cfg(), tmp_path / "other", progress=False)
    # a finished run started again with the same command only re-exports
    train_sae(TensorSource(x), small_cfg(log_every=3), out, progress=False)
    assert (out / "sae_weights.safetensors").read_bytes() == before["sae_weights.safetensors"]
    # a kill during the first checkpoint's write left only its temp file: the same command starts over
    (tmp_path / "torn").mkdir()
    (tmp_path / "torn" / ".checkpoint.pt.tmp4242").write_bytes(b"half a checkpoint")
    train_sae(TensorSource(x), small_cfg(), tmp_path / "torn", progress=False)
    assert (tmp_path / "torn" / "sae_weights.safetensors").read_bytes() == before["sae_weights.safetensors"]
    assert not list((tmp_path / "torn").glob(".*.tmp*"))
    # a run that failed before its first checkpoint left metrics.jsonl alone: the corrected command starts over
    (tmp_path / "failed").mkdir()
    (tmp_path / "failed" / "metrics.jsonl").write_text('{"step": 1, "stale": true}\n')
    train_sae(TensorSource(x), small_cfg(), tmp_path / "failed", progress=False)
    assert (tmp_path / "failed" / "sae_weights.safetensors").read_bytes() == before["sae_weights.safetensors"]
    assert "stale" not in (tmp_path / "failed" / "metrics.jsonl").read_text()


class NaNAt:
    """A source whose batch ``bad`` holds a NaN (an activation store with a broken row)."""

    def __init__(self, x: torch.Tensor, bad: int):
        self.x, self.bad, self.d = x, bad, x.shape[1]

    def __len__(self) -> int:
        return len(self.x)

    def loader(self, batch_size, *, start_batch=0, **_):
        for i in range(start_batch, len(self.x) // batch_size):
            batch = self.x[i * batch_size:(i + 1) * batch_size].clone()
            if i == self.bad:
                batch[7, 3] = float("nan")
            yield batch


def test_diverged_run_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    x, _ = dictionary_data(512 * 12)
    out = tmp_path / "sae"
    with pytest.raises(UserError, match=r"training diverged at step 8 .*last good checkpoint \(step 5\) is kept"):
        train_sae(NaNAt(x, bad=7), small_cfg(), out, progress=False)
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["step"] == 5 and all(torch.isfinite(t).all() for t in state["runs"][""]["sae"].values())
    assert not (out / "sae_weights.safetensors").exists()


# --------------------------------------------------------------------------- processes
WORKER = textwrap.dedent("""
    import json, os, signal, sys
    import torch
    torch.set_num_threads(1)
    from llama_sae.sae import train as T

    out, kill_at, cfg = sys.argv[1], int(sys.argv[2]), T.TrainConfig(**json.loads(sys.argv[3]))
    if kill_at:
        save = T.save_checkpoint
        def save_then_die(path, runs, cfg, d_in, step, extra):
            save(path, runs, cfg, d_in, step, extra)
            if step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)  # kill -9, right after a checkpoint
        T.save_checkpoint = save_then_die
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512 * 16, 24, generator=g) * torch.linspace(0.2, 3, 24) + 1.0
    T.train_sae(T.TensorSource(x), cfg, out, progress=False)
""")


def _run(tmp_path: Path, out: Path, cfg: TrainConfig, kill_at: int = 0, ranks: int = 1) -> subprocess.CompletedProcess:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    launcher = [sys.executable]
    if ranks > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    return subprocess.run(launcher + [str(script), str(out), str(kill_at), cfg.model_dump_json()],
                          capture_output=True, text=True, timeout=240, env=env)


@pytest.mark.parametrize("kill_at", [9, 12])  # after a checkpoint between records; at a record's own step
def test_kill_9_then_same_command_ends_bitwise_equal(tmp_path, kill_at):
    cfg = small_cfg(d_sae=256, k=4, batch_size=512, tokens=512 * 20, dead_tokens_threshold=512, checkpoint_every=3,
                    log_every=4, normalize_activations="layer_norm")
    whole = _run(tmp_path, tmp_path / "whole", cfg)
    assert whole.returncode == 0, whole.stderr
    killed = _run(tmp_path, tmp_path / "killed", cfg, kill_at=kill_at)
    assert killed.returncode == -9, killed.stderr
    assert not (tmp_path / "killed" / "sae_weights.safetensors").exists()
    resumed = _run(tmp_path, tmp_path / "killed", cfg)
    assert resumed.returncode == 0, resumed.stderr
    for name in ("sae_weights.safetensors", "sparsity.safetensors", "cfg.json"):
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "killed" / name).read_bytes(), name
    a, b = (read_metrics(tmp_path / d / "metrics.jsonl") for d in ("whole", "killed"))
    assert [r["step"] for r in b] == [4, 8, 12, 16, 20]
    for ra, rb in zip(a, b):  # the record at 12 averages steps 10-12 only after the resume at 9
        keys = ("dead_frac", "lr") if ra["step"] == 12 and kill_at == 9 else set(ra) - {"tokens_per_s"}
        assert {k: ra[k] for k in keys} == {k: rb[k] for k in keys}
    assert max(r["dead_frac"] for r in a) > 0 and max(r["aux_loss"] for r in a) > 0  # aux-k was part of the resume


def test_two_ranks_train_the_same_weights_as_one_process(tmp_path):
    cfg = small_cfg(d_sae=256, k=4, batch_size=512, tokens=512 * 8, dead_tokens_threshold=512, checkpoint_every=100,
                    normalize_activations="layer_norm")
    one = _run(tmp_path, tmp_path / "one", cfg)
    assert one.returncode == 0, one.stderr
    two = _run(tmp_path, tmp_path / "two", cfg, ranks=2)
    assert two.returncode == 0, two.stderr
    a, b = load(tmp_path / "one"), load(tmp_path / "two")
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)  # same maths, another summation order
    ra, rb = (read_metrics(tmp_path / d / "metrics.jsonl") for d in ("one", "two"))
    assert [r["dead_frac"] for r in ra] == [r["dead_frac"] for r in rb]
    assert [r["fvu"] for r in ra] == pytest.approx([r["fvu"] for r in rb], rel=1e-4)


# --------------------------------------------------------------------------- a real activation store
def test_trains_on_a_captured_store(tmp_path):
    capture_mod = pytest.importorskip("llama_sae.capture", reason="the capture stage is not in this checkout")
    from llama_sae import tinyworld
    from llama_sae.llama.checkpoint import save_hf
    from llama_sae.llama.model import ModelArgs, Transformer
    from llama_sae.sae.train import train

    tinyworld.train_bpe_tokenizer([r.text for r in tinyworld.sentences(2000, seed=0)], tmp_path / "tok", vocab_size=512)
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32))
    model_dir = save_hf(model, tmp_path / "model", tokenizer_dir=tmp_path / "tok")
    store = tmp_path / "acts"
    capture_mod.capture(capture_mod.CaptureConfig(model=str(model_dir), corpus="tinyworld:2000", hooks=["resid_post.1"],
                                                  tokens=4000, out=str(store), context=64, batch_tokens=1024,
                                                  shard_rows=1000, progress=False))
    cfg = TrainConfig(d_sae=128, k=8, batch_size=512, log_every=2, plots=False)
    (path,) = train(store, tmp_path / "sae", cfg, progress=False)
    sae = load(path)
    assert sae.cfg.hook_name == "resid_post.1" and sae.cfg.d_in == 32 and sae.cfg.context_size == 64
    assert sae.cfg.model_name == str(Path(model_dir).resolve())
    with pytest.raises(UserError, match="not resid_post.0"):
        train(store, tmp_path / "sae2", cfg.model_copy(update={"hook": "resid_post.0"}), progress=False)
    evaluated = cfg.model_copy(update={"eval_every": 2, "eval_model": str(model_dir), "eval_corpus": "txt:/nonexist"})
    with pytest.raises(UserError, match="no such file or folder: /nonexist"):
        train(store, tmp_path / "sae3", evaluated, progress=False)
    assert not (tmp_path / "sae3").exists()  # a run that fails while setting up leaves no new, empty --out


@pytest.mark.parametrize("content, message", [(b"k: [1\n", "not readable YAML"), (b"- 1\n- 2\n", "holds a list"),
                                               (b"k: \xff\xfe\n", "not readable YAML")])
def test_a_bad_config_file_is_one_line(tmp_path, content, message):
    from llama_sae.sae.train import load_config

    (tmp_path / "c.yaml").write_bytes(content)
    with pytest.raises(UserError, match=message):
        load_config(None, tmp_path / "c.yaml")


@pytest.mark.parametrize("at", [3, 4, 10])  # between records; a record's own step; the last step
def test_ctrl_c_stops_after_the_step_with_a_checkpoint_and_the_resume_is_exact(tmp_path, at):
    """Ctrl-C (SIGINT) while training: the step in progress completes (and its metrics record, if one is due),
    a checkpoint of it is written (none was due: checkpoint_every is past the end), and the same command ends
    with the uninterrupted run's weights and records. On the last step the run just finishes."""
    import signal

    from llama_sae.sae.train import CHECKPOINT, Interrupted

    g = torch.Generator().manual_seed(0)
    x = torch.randn(512 * 12, 24, generator=g) * torch.linspace(0.2, 3, 24) + 1.0

    class InterruptAt(TensorSource):
        def loader(self, *args, **kwargs):
            for i, batch in enumerate(super().loader(*args, **kwargs)):
                if i == at - 1 and kwargs.get("start_batch") == 0:
                    os.kill(os.getpid(), signal.SIGINT)  # while step `at` is about to run
                yield batch

    cfg = small_cfg(d_sae=256, k=4, tokens=512 * 10, checkpoint_every=100, log_every=4)
    train_sae(TensorSource(x), cfg, tmp_path / "whole", progress=False)
    before = signal.getsignal(signal.SIGINT)  # Python's default handler, or SIG_IGN in a background job
    if at < 10:
        with pytest.raises(Interrupted, match=f"interrupted at step {at} of 10: checkpoint written to .*; the same "
                                              "command resumes from it"):
            train_sae(InterruptAt(x), cfg, tmp_path / "stopped", progress=False)
        assert (tmp_path / "stopped" / CHECKPOINT).exists() and not (tmp_path / "stopped" / "cfg.json").exists()
        assert signal.getsignal(signal.SIGINT) is before  # the handler is put back
    train_sae(InterruptAt(x), cfg, tmp_path / "stopped", progress=False)  # resumes at `at`: no new interrupt
    assert (tmp_path / "whole" / "sae_weights.safetensors").read_bytes() == \
        (tmp_path / "stopped" / "sae_weights.safetensors").read_bytes()
    whole, stopped = (read_metrics(tmp_path / d / "metrics.jsonl") for d in ("whole", "stopped"))
    assert [r["step"] for r in stopped] == [r["step"] for r in whole] == [4, 8, 10]  # no record lost or added


def test_cli_train_says_what_an_interrupt_kept(monkeypatch):
    """typer turns a KeyboardInterrupt into a silent exit 130: the train command prints the trainer's message."""
    from typer.testing import CliRunner

    import llama_sae.sae.train as T
    from llama_sae.cli import app

    def interrupted(*args, **kwargs):
        raise T.Interrupted("interrupted at step 7 of 9: checkpoint written to out/checkpoint.pt; the same command "
                            "resumes from it")

    monkeypatch.setattr(T, "train", interrupted)
    result = CliRunner().invoke(app, ["train", "--store", "s", "--out", "o", "--d-sae", "64", "--k", "4"])
    assert result.exit_code == 130 and "interrupted at step 7 of 9: checkpoint written" in result.output


def test_resume_refuses_a_store_with_another_split_or_shard_layout(tmp_path):
    """Two captures of the same corpus by the same model, with the same row count, but another validation split or
    other shards: other batches, so a checkpoint of one does not resume on the other."""
    from test_store import make_store

    from llama_sae.sae.train import train

    stores = {name: make_store(tmp_path / name, sentences=400, d=8, val_percent=vp, shard_rows=rows)
              for name, vp, rows in (("a", 10, 97), ("split", 20, 97), ("shards", 10, 50))}
    cfg = small_cfg(d_sae=32, k=4, batch_size=128, tokens=128 * 6)
    train(stores["a"], tmp_path / "run", cfg, progress=False)
    for name in ("split", "shards"):
        with pytest.raises(UserError, match=r"trained on other activations \(shards [0-9a-f]+… \(now [0-9a-f]+…\)\)"):
            train(stores[name], tmp_path / "run", cfg, progress=False)
    train(stores["a"], tmp_path / "run", cfg, progress=False)  # its own store: the finished run re-exports
