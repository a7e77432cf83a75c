"""The trainer's spliced evaluation (model-loaded runs), evaluation.json and the frequency histogram, and
``llama-sae evaluate`` writing its report and PNG."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from llama_sae import tinyworld
from llama_sae.cli import app
from llama_sae.errors import UserError
from llama_sae.llama import load_model, load_tokenizer
from llama_sae.sae import load
from llama_sae.sae.evaluate import EVAL_LOG, EVAL_REPORT, activation_metrics, model_metrics, token_batches
from llama_sae.sae.train import TensorSource, TrainConfig, train_sae

HOOK = "resid_post.2"
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def acts():
    """resid_post.2 activations of 120 tinyworld sentences through the shipped model [N, 256], BOS left out."""
    model, tok = load_model(tinyworld.model_path()), load_tokenizer(tinyworld.model_path())
    return torch.cat([rows for rows, _ in _acts_and_bos(model, tok, [r.text for r in tinyworld.sentences(120)])])


def _acts_and_bos(model, tok, texts):
    """Per batch: (the real tokens' activations after BOS, BOS's), masked here independently of the evaluator."""
    for tokens, mask in token_batches(tok, texts, batch_size=40):
        h = model.capture(tokens, [HOOK])[HOOK].float()
        after_bos = mask & (torch.arange(tokens.shape[1]) > 0)
        yield h[after_bos], h[:, 0]


def test_training_runs_spliced_evaluations_and_stores_the_final_one(tmp_path, acts):
    cfg = TrainConfig(d_sae=512, k=8, batch_size=256, tokens=256 * 12, lr=2e-3, log_every=4, checkpoint_every=100,
                      plots=True, eval_every=8, eval_model=str(tinyworld.model_path()),
                      eval_corpus="tinyworld:12:heldout", eval_texts=12)
    out = tmp_path / "run"
    (path,) = train_sae(TensorSource(acts, hook=HOOK, model="tinyworld"), cfg, out, progress=False)
    records = [json.loads(line) for line in (out / EVAL_LOG).read_text().splitlines()]
    assert [r["step"] for r in records] == [8, 12]  # every 8 steps (at a metrics record), and the end
    assert all(r["kl"] >= 0 and 0 < r["fvu"] < 1 and r["l0"] <= 8 for r in records)
    final = json.loads((path / EVAL_REPORT).read_text())
    assert final["step"] == 12 and final["ce_recovered"] == records[-1]["ce_recovered"]
    train_sae(TensorSource(acts, hook=HOOK, model="tinyworld"), cfg, out, progress=False)  # the finished run again
    assert (out / EVAL_LOG).read_text().count("\n") == 2  # no second record of the last step
    assert (path / "frequency.png").read_bytes()[:8] == PNG
    assert (out / "plots" / "eval_ce_recovered.png").read_bytes()[:8] == PNG
    # independent: the saved SAE, spliced into a freshly loaded model on the same texts, gives the same numbers
    model, tok = load_model(tinyworld.model_path()), load_tokenizer(tinyworld.model_path())
    from itertools import islice

    from llama_sae.corpus import iter_sentences

    texts = [s.text for s in islice(iter_sentences("tinyworld:12:heldout"), 12)]
    again = model_metrics(model, load(path), token_batches(tok, texts))
    for key in ("ce_clean", "ce_spliced", "ce_zero_ablated", "kl"):
        assert again[key] == pytest.approx(final[key], rel=1e-5, abs=1e-6), key
    # FVU and L0 on the texts' activations with BOS left out, as in a store (BOS's norm would dominate FVU)
    pairs = list(_acts_and_bos(model, tok, texts))
    no_bos = activation_metrics(load(path), [rows for rows, _ in pairs])
    with_bos = activation_metrics(load(path), [torch.cat([rows, bos]) for rows, bos in pairs])
    assert final["tokens"] == no_bos["tokens"] == with_bos["tokens"] - len(texts)
    assert final["fvu"] == pytest.approx(no_bos["fvu"], rel=1e-5) and final["l0"] == pytest.approx(no_bos["l0"])
    assert with_bos["fvu"] > 1.05 * no_bos["fvu"]  # the difference the rule makes, even this early in training


def test_evaluation_settings_go_together(tmp_path, acts):
    with pytest.raises(UserError, match="needs eval_every, eval_model and eval_corpus together"):
        from llama_sae.sae.train import load_config

        load_config(d_sae=512, k=8, eval_every=4)
    cfg = TrainConfig(d_sae=512, k=8, batch_size=256, tokens=256 * 2, eval_every=1,
                      eval_model=str(tinyworld.model_path()), eval_corpus="tinyworld:4", eval_texts=4)
    with pytest.raises(UserError, match="unknown hook point 'acts'"):  # before any step is run
        train_sae(TensorSource(acts), cfg, tmp_path / "nohook", progress=False)
    assert not (tmp_path / "nohook" / "checkpoint.pt").exists()
    # a run stopped before its first checkpoint leaves its logs (metrics.jsonl, eval.jsonl): it starts over
    early = tmp_path / "early"
    early.mkdir()
    (early / "metrics.jsonl").write_text('{"step": 4}\n')
    (early / EVAL_LOG).write_text('{"step": 4, "sae": ""}\n')
    cfg = TrainConfig(d_sae=512, k=8, batch_size=256, tokens=256 * 2, log_every=1, plots=False)
    train_sae(TensorSource(acts, hook=HOOK), cfg, early, progress=False)
    assert not (early / EVAL_LOG).exists() and '"step": 4' not in (early / "metrics.jsonl").read_text()


def test_cli_evaluate_writes_report_and_histogram(tmp_path, acts):
    from llama_sae.sae import SAE, SAEConfig
    from llama_sae.sae.model import normalize

    sae = SAE(SAEConfig(d_in=256, d_sae=512, k=8, hook_name=HOOK))
    sae.init_(normalize(acts, "layer_norm")[0], generator=torch.Generator().manual_seed(0))
    sae.save(tmp_path / "sae")
    result = CliRunner().invoke(app, ["evaluate", "--sae", str(tmp_path / "sae"), "--corpus", "tinyworld:8:heldout",
                                      "--n-texts", "8", "--out", str(tmp_path / "report.json")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "report.json").read_text())
    assert {"ce_recovered", "kl", "kl_by_position"} <= set(report)
    assert "CE recovered" in result.output
    assert report["encoder_dtype"] == "float32"
    # without --store, the activation metrics come from the corpus texts' activations, BOS left out
    model, tok = load_model(tinyworld.model_path()), load_tokenizer(tinyworld.model_path())
    from itertools import islice

    from llama_sae.corpus import iter_sentences

    texts = [s.text for s in islice(iter_sentences("tinyworld:8:heldout"), 8)]
    direct = activation_metrics(sae, [rows for rows, _ in _acts_and_bos(model, tok, texts)])
    assert report["tokens"] == direct["tokens"] and report["fvu"] == pytest.approx(direct["fvu"], rel=1e-5)
    assert "FVU" in result.output and (tmp_path / "report_frequency.png").read_bytes()[:8] == PNG
    result = CliRunner().invoke(app, ["evaluate", "--sae", str(tmp_path / "sae"), "--corpus", "tinyworld:8:heldout",
                                      "--n-texts", "8", "--bf16-encoder", "--out", str(tmp_path / "bf16.json")])
    assert result.exit_code == 0, result.output
    fast = json.loads((tmp_path / "bf16.json").read_text())
    assert fast["encoder_dtype"] == "bfloat16" and fast["ce_clean"] == report["ce_clean"]
    assert fast["ce_spliced"] != report["ce_spliced"]  # the bf16 encoder ran ...
    assert fast["ce_recovered"] == pytest.approx(report["ce_recovered"], abs=0.02)  # ... and changes little
    from llama_sae.sae.evaluate import plot_frequency

    rep = activation_metrics(sae, [acts])
    assert plot_frequency(rep, tmp_path / "f.png").read_bytes()[:8] == PNG
    assert rep["dead"] + int((torch.tensor(rep["frequency"]) > 0).sum()) == 512


def test_demo_export_stage(tmp_path, acts):
    from rich.console import Console

    from llama_sae.demo import _export
    from llama_sae.sae import SAE, SAEConfig
    from llama_sae.sae.model import normalize

    sae = SAE(SAEConfig(d_in=256, d_sae=512, k=8, hook_name=HOOK))
    sae.init_(normalize(acts, "layer_norm")[0], generator=torch.Generator().manual_seed(1))
    sae.save(tmp_path / "sae", sparsity=torch.full((512,), -2.0))
    console = Console(record=True, width=200)
    path = _export(console, tmp_path / "sae", activation_metrics(sae, [acts]), tmp_path)
    assert str(path) in console.export_text() and (tmp_path / "frequency.png").read_bytes()[:8] == PNG
    assert sorted(p.name for p in path.iterdir()) == ["cfg.json", "sae_weights.safetensors", "sparsity.safetensors"]
    torch.testing.assert_close(load(path)(acts[:50]), sae(acts[:50]), rtol=0, atol=0)


def test_ctrl_c_between_records_keeps_the_evaluation_schedule(tmp_path, acts):
    """Stopped by Ctrl-C between metrics records and resumed, a run evaluates at the same steps as one that ran
    through (the evaluation due at the next record is still owed); run again when finished, with other
    evaluation settings, its last record is replaced, not duplicated, and agrees with evaluation.json."""
    import os
    import signal

    from llama_sae.sae.train import Interrupted

    class InterruptAt(TensorSource):
        def loader(self, *args, **kwargs):
            for i, batch in enumerate(super().loader(*args, **kwargs)):
                if i == 5 and kwargs.get("start_batch") == 0:
                    os.kill(os.getpid(), signal.SIGINT)  # during step 6: between the records at 4 and 8
                yield batch

    cfg = TrainConfig(d_sae=512, k=8, batch_size=256, tokens=256 * 12, lr=2e-3, log_every=4, checkpoint_every=100,
                      plots=False, eval_every=5, eval_model=str(tinyworld.model_path()),
                      eval_corpus="tinyworld:6:heldout", eval_texts=6)
    train_sae(TensorSource(acts, hook=HOOK), cfg, tmp_path / "whole", progress=False)
    with pytest.raises(Interrupted, match="interrupted at step 6 of 12"):
        train_sae(InterruptAt(acts, hook=HOOK), cfg, tmp_path / "stopped", progress=False)
    train_sae(InterruptAt(acts, hook=HOOK), cfg, tmp_path / "stopped", progress=False)
    whole, stopped = ([json.loads(line) for line in (tmp_path / d / EVAL_LOG).read_text().splitlines()]
                      for d in ("whole", "stopped"))
    assert [r["step"] for r in stopped] == [r["step"] for r in whole] == [8, 12]
    assert stopped == whole
    fewer = cfg.model_copy(update={"eval_texts": 3})
    train_sae(TensorSource(acts, hook=HOOK), fewer, tmp_path / "whole", progress=False)  # finished: evaluated again
    again = [json.loads(line) for line in (tmp_path / "whole" / EVAL_LOG).read_text().splitlines()]
    final = json.loads((tmp_path / "whole" / EVAL_REPORT).read_text())
    assert [r["step"] for r in again] == [8, 12] and again[-1]["ce_spliced"] == final["ce_spliced"] != \
        whole[-1]["ce_spliced"]


def test_a_run_killed_during_an_evaluation_runs_it_when_resumed(tmp_path, acts, monkeypatch):
    """The checkpoint at step 8 is written before step 8's evaluation: killed during that evaluation, the resumed
    run evaluates step 8 first, and its eval.jsonl equals an uninterrupted run's."""
    from llama_sae.sae.evaluate import TrainingEval

    cfg = TrainConfig(d_sae=512, k=8, batch_size=256, tokens=256 * 12, lr=2e-3, log_every=4, checkpoint_every=8,
                      plots=False, eval_every=8, eval_model=str(tinyworld.model_path()),
                      eval_corpus="tinyworld:6:heldout", eval_texts=6)
    train_sae(TensorSource(acts, hook=HOOK), cfg, tmp_path / "whole", progress=False)

    class Killed(BaseException):
        pass

    report = TrainingEval.report

    def killed_at_8(self, sae):
        if self.last == 8:
            raise Killed  # as kill -9 inside the evaluation: nothing after the checkpoint is written
        return report(self, sae)

    with monkeypatch.context() as m:
        m.setattr(TrainingEval, "report", killed_at_8)
        with pytest.raises(Killed):
            train_sae(TensorSource(acts, hook=HOOK), cfg, tmp_path / "killed", progress=False)
    assert (tmp_path / "killed" / EVAL_LOG).read_text() == ""
    train_sae(TensorSource(acts, hook=HOOK), cfg, tmp_path / "killed", progress=False)
    whole, killed = ([json.loads(line) for line in (tmp_path / d / EVAL_LOG).read_text().splitlines()]
                     for d in ("whole", "killed"))
    assert [r["step"] for r in killed] == [8, 12] and killed == whole


def test_a_written_config_passed_back_keeps_the_store_model_default(tmp_path, acts):
    """train_config.yaml says `eval_model: null`; passed back with --config, --eval-every still splices into the
    store's model (the default fills what every level leaves unset)."""
    from llama_sae.sae.train import load_config

    written = tmp_path / "train_config.yaml"
    written.write_text("d_sae: 512\nk: 8\neval_model: null\neval_corpus: null\n")
    cfg = load_config(None, written, defaults={"eval_model": "STORE_MODEL"}, eval_every=2, eval_corpus="c")
    assert cfg.eval_model == "STORE_MODEL"
    written.write_text("d_sae: 512\nk: 8\neval_model: OTHER\n")
    assert load_config(None, written, defaults={"eval_model": "STORE_MODEL"}, eval_every=2,
                       eval_corpus="c").eval_model == "OTHER"
