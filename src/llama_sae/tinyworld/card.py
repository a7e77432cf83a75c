"""The shipped model's card: how it was made, how well it models the world, what its layers know."""

from __future__ import annotations

import json
import math
from pathlib import Path

from llama_sae.fileio import atomic_write, atomic_write_json


def evaluate_model(model_dir: str | Path, *, n_train: int = 3000, n_test: int = 1500) -> dict:
    """Probe table and topic-continuation rate of the model in ``model_dir`` (written to evaluation.json)."""
    from llama_sae.llama import load_model, load_tokenizer
    from llama_sae.tinyworld.probe import on_topic_rate, probe_table

    model_dir = Path(model_dir)
    model = load_model(model_dir, dtype="float32")
    tokenizer = load_tokenizer(model_dir)
    result = {"probes": probe_table(model, tokenizer, n_train=n_train, n_test=n_test),
              "topic_continuations": on_topic_rate(model, tokenizer)}
    atomic_write_json(model_dir / "evaluation.json", result)
    return result


def _fmt(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:.3f}"


def probe_summary(probes: dict, threshold: float = 0.95) -> dict[str, float]:
    """Per readout: the fraction of concepts whose held-out AUROC is at least ``threshold``."""
    return {key: sum(a >= threshold for a in v) / len(v) for key, v in probes["readouts"].items()}


def write_model_card(model_dir: str | Path, command: str) -> Path:
    """README.md for the model: command, seed, steps, held-out loss and perplexity, the probe table."""
    model_dir = Path(model_dir)
    training = json.loads((model_dir / "training.json").read_text())
    evaluation = json.loads((model_dir / "evaluation.json").read_text())
    cfg, probes, topics = training["config"], evaluation["probes"], evaluation["topic_continuations"]
    config = json.loads((model_dir / "config.json").read_text())
    n_layers = config["num_hidden_layers"]
    summary = probe_summary(probes)
    mid = n_layers // 2  # L{mid} = resid_post.{mid - 1}: after half of the blocks
    lines = [
        "# tinyworld Llama",
        "",
        "A small Llama 3-architecture model (RoPE with llama3 scaling, GQA, tied embeddings), trained from",
        "scratch by llama-sae on the tinyworld corpus of planted concepts, with its own byte-level BPE",
        "that carries the Llama 3 special tokens. Stored in bf16, Hugging Face format.",
        "",
        f"- made with: `{command}` (seed {cfg['seed']})",
        f"- shape: d_model {config['hidden_size']}, {n_layers} layers, {config['num_attention_heads']} heads "
        f"({config['num_key_value_heads']} kv), FFN {config['intermediate_size']}, vocab {config['vocab_size']}",
        f"- training: {training['steps']} steps, {training['train_tokens']:,} tokens, "
        f"rows of {cfg['context']} tokens, AdamW lr {cfg['lr']} → {cfg['lr_min']}",
        f"- held-out loss {training['heldout_loss']:.4f} nats/token, perplexity {training['heldout_perplexity']:.2f}",
        f"- greedy continuations of {topics['prompts']} topic prompts: {topics['on_topic']:.0%} stay on the "
        f"prompt's topic (mention it and no other), {topics['mentions_topic']:.0%} mention it",
        "",
        "## Linear probes",
        "",
        f"Logistic-regression probes trained on {probes['n_train']:,} train sentences, AUROC on "
        f"{probes['n_test']:,} held-out sentences. L0 is the embedding layer; L{{i}} is the output of block i-1",
        f"(hook point resid_post.{{i-1}}). The middle layer is L{mid} (resid_post.{mid - 1}, after {mid} of "
        f"{n_layers} blocks).",
        "",
        "Fraction of concepts with AUROC ≥ 0.95 (a mean-pooled probe separates word-list topics even on the "
        "embeddings, so compare the layers with L0 and with the bag-of-words baseline):",
        "",
        "| readout | " + " | ".join(summary) + " |",
        "|---|" + "---:|" * len(summary),
        "| fraction | " + " | ".join(f"{v:.2f}" for v in summary.values()) + " |",
        "",
        "Per concept (mean-pooled and last-token readouts at the embeddings and the middle layer, and the "
        "bag-of-words baseline):",
        "",
    ]
    keys = ["L0 mean", "L0 last", f"L{mid} mean", f"L{mid} last", "bag of words"]
    lines.append("| concept | " + " | ".join(keys) + " |")
    lines.append("|---|" + "---:|" * len(keys))
    for c, name in enumerate(probes["concepts"]):
        lines.append(f"| {name} | " + " | ".join(_fmt(probes["readouts"][k][c]) for k in keys) + " |")
    lines += ["", "Sample continuations (greedy):", ""]
    lines += [f"- {ex}" for ex in topics["examples"]]
    path = model_dir / "README.md"
    atomic_write(path, "\n".join(lines) + "\n")
    return path
