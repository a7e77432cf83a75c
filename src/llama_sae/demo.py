"""``llama-sae demo``: every stage that exists, end to end, on the shipped tinyworld model and corpus."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table


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


def _model(console: Console):
    from llama_sae import tinyworld
    from llama_sae.cli import model_table
    from llama_sae.llama import load_model, load_tokenizer
    from llama_sae.llama.checkpoint import read_args

    path = tinyworld.model_path()
    console.rule("[bold]2. the tiny Llama 3 model (our own implementation, Hugging Face format on disk)")
    fmt, args = read_args(path)
    console.print(model_table(args, fmt, str(path)))
    return load_model(path), load_tokenizer(path)


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


def run_demo(out: Path, console: Console | None = None) -> None:
    """Run the demo, writing any files under ``out``."""
    console = console or Console()
    out.mkdir(parents=True, exist_ok=True)
    _world(console)
    model, tokenizer = _model(console)
    _generation(console, model, tokenizer)
    console.rule("[bold]done")
    console.print("Next: point any stage at a real checkpoint with --model PATH (see README).")
