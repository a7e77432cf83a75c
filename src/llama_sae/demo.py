"""``llama-sae demo``: every stage that exists, end to end, on the shipped tinyworld model and corpus."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from llama_sae.errors import check_output_dir


def _world(console: Console) -> None:
    from llama_sae import tinyworld

    concepts = tinyworld.concepts()
    topics = [c.name for c in concepts if c.kind == "topic"]
    forms = [c.name for c in concepts if c.kind != "topic"]
    console.rule("[bold]1. tinyworld: a corpus whose concepts we know")
    console.print(f"{len(topics)} topics: {', '.join(topics)}")
    console.print(f"{len(forms)} forms: {', '.join(forms)}")
    table = Table("sentence", "planted concepts", title="samples from the generator (held-out split)")
    for rec in tinyworld.sentences(6, seed=1, split="heldout"):
        table.add_row(rec.text, ", ".join(rec.concepts))
    console.print(table)


def _model(console: Console, device: str = "cpu"):
    from llama_sae import tinyworld
    from llama_sae.cli import model_table
    from llama_sae.llama import load_model, load_tokenizer
    from llama_sae.llama.checkpoint import read_args

    path = tinyworld.model_path()
    console.rule("[bold]2. the tiny Llama 3 model (ours; Hugging Face format on disk)")
    fmt, args = read_args(path)
    console.print(model_table(args, fmt, str(path)))
    return load_model(path, device=device), load_tokenizer(path)


def _generation(console: Console, model, tokenizer) -> None:
    from llama_sae import tinyworld
    from llama_sae.llama import generate

    console.rule("[bold]3. text completion (greedy, batched, KV cache)")
    prompts = [p for p, _ in tinyworld.topic_prompts()[::7][:5]]
    for prompt, out in zip(prompts, generate(model, tokenizer, prompts, max_new_tokens=24)):
        console.print(f"[bold]{prompt}[/bold]{out.text}", highlight=False)
    console.rule("[bold]4. chat (Llama 3 chat format, streamed)")
    question = tinyworld.dialogues(1, seed=3, split="heldout")[0].messages[0]["content"]
    console.print(f"[bold]user:[/bold] {question}", highlight=False)
    console.print("[bold]assistant:[/bold] ", end="")
    messages = [{"role": "user", "content": question}]
    for chunk in generate(model, tokenizer, messages, chat=True, stream=True, max_new_tokens=48):
        console.print(chunk.text, end="", markup=False, highlight=False)
    console.print()


DEMO_HOOK = "resid_post.3"  # past the middle of the 6 blocks: where most planted concepts have a latent
STEER_HOOK = "resid_post.5"  # the last block: its latents steer best (BENCHMARKS.md, steering)


def _capture(console: Console, out: Path, device: str = "cpu") -> Path:
    from llama_sae import tinyworld
    from llama_sae.capture import capture as run_capture
    from llama_sae.capture import capture_config

    console.rule(f"[bold]5. capture {DEMO_HOOK} and {STEER_HOOK} into a sharded store")
    cfg = capture_config(model=str(tinyworld.model_path()), corpus="tinyworld:60000", hooks=[DEMO_HOOK, STEER_HOOK],
                         tokens=600_000, out=str(out / "store"), context=128, batch_tokens=8192, device=device)
    summary = run_capture(cfg, console=console)
    table = Table(show_header=False)
    for key, value in summary.rows_table():
        table.add_row(key, value)
    console.print(table)
    return summary.path


def _train(console: Console, store: Path, out: Path, hook: str = DEMO_HOOK, title: str | None = None,
           device: str = "cpu"):
    from llama_sae.sae import load
    from llama_sae.sae.train import load_config, train

    # Chosen by a sweep on concept recovery (BENCHMARKS.md): resid_post.1/.2/.3, 1,024-4,096 latents, k 8-32.
    console.rule(title or f"[bold]6. train a TopK SAE (1,024 latents, k = 32) on the store's {hook}")
    cfg = load_config(d_sae=1024, k=32, batch_size=2048, epochs=6, bf16=True, log_every=25, checkpoint_every=200,
                      dead_tokens_threshold=200_000, plots=False, hook=hook, device=device)
    (sae_dir,) = train(store, out / ("sae" if hook == DEMO_HOOK else f"sae_{hook}"), cfg)
    return load(sae_dir, device=device), sae_dir


def _recovery(console: Console, model, tokenizer, sae) -> dict:
    from llama_sae.tinyworld.recovery import concept_recovery, print_recovery

    console.rule("[bold]7. ground truth: which planted concepts does a latent pick out?")
    result = concept_recovery(model, tokenizer, sae)
    print_recovery(console, result)
    return result


def _evaluate(console: Console, model, tokenizer, sae, store: Path) -> dict:
    from llama_sae import tinyworld
    from llama_sae.sae.evaluate import activation_metrics, model_metrics, summary_rows, token_batches
    from llama_sae.store import ActivationStore

    console.rule("[bold]8. the SAE spliced into the model: what does the model lose?")
    acts = ActivationStore(store).loader(4096, shuffle=False, split="val", epochs=1, drop_last=False,
                                           hook=DEMO_HOOK)
    report = activation_metrics(sae, acts)
    texts = [d.text for d in tinyworld.documents(200, seed=5, split="heldout")]
    report.update(model_metrics(model, sae, token_batches(tokenizer, texts)))
    table = Table("metric", "value", title="held-out evaluation")
    for key, value in summary_rows(report):
        table.add_row(key, value)
    console.print(table)
    return report


def _export(console: Console, sae_dir: Path, report: dict, out: Path) -> Path:
    """The SAE exported in SAELens v6 format (what sae_lens.SAE.load_from_disk reads), and the histogram PNG."""
    from llama_sae.sae.evaluate import plot_frequency
    from llama_sae.sae.formats import convert

    path = convert(sae_dir, "saelens", out / "export" / "saelens")
    console.print(f"SAE exported in SAELens v6 format (cfg.json + sae_weights.safetensors + sparsity): [bold]{path}"
                  f"[/bold]\n  load it with: sae_lens.SAE.load_from_disk({str(path)!r}); sparsify: llama-sae sae "
                  "convert --to sparsify (needs normalize_activations none); hub: llama-sae sae push")
    hist = plot_frequency(report, out / "frequency.png")
    if hist is not None:
        console.print(f"firing-frequency histogram: {hist}")
    return path


DEMO_FILES = {"store", "sae", f"sae_{STEER_HOOK}", "export", "frequency.png", "report.json", "features", "dashboard"}


def run_demo(out: Path, console: Console | None = None, device: str = "cpu") -> None:
    """Run the demo, writing its store, SAE and reports under ``out``; the model, the capture, training and every
    later stage run on ``device`` (cpu, cuda, ...)."""
    from llama_sae.fileio import atomic_write_json
    from llama_sae.interpret.groundtruth import stage as interpret_stage
    from llama_sae.ui.demo import stage as steer_stage

    console = console or Console(emoji=False)
    check_output_dir(out, "the demo's files", ours=DEMO_FILES)  # a re-run finds its own files there
    out.mkdir(parents=True, exist_ok=True)
    _world(console)
    model, tokenizer = _model(console, device)
    _generation(console, model, tokenizer)
    store = _capture(console, out, device)
    sae, sae_dir = _train(console, store, out, device=device)
    recovery = _recovery(console, model, tokenizer, sae)
    report = _evaluate(console, model, tokenizer, sae, store)
    _export(console, sae_dir, report, out)
    interpretation = interpret_stage(console, model, tokenizer, sae, recovery, out, sae_path=str(sae_dir))
    title = f"[bold]10. steering: a second SAE at {STEER_HOOK}, the last block"
    steer_sae, _ = _train(console, store, out, STEER_HOOK, title, device)
    steering = steer_stage(console, model, tokenizer, sae, sae_dir, Path(interpretation["features"]), out,
                           steer_sae=steer_sae)
    report.pop("frequency")
    atomic_write_json(out / "report.json", {"recovery": recovery, "evaluation": report,
                                            "interpretation": interpretation, "steering": steering})
    console.print(f"SAE (trained, SAELens v6 layout): {sae_dir}")
    console.rule("[bold]done")
    console.print("Next: point any stage at a real checkpoint with --model PATH (see README).")
