"""tinyworld: a synthetic English corpus with planted, exactly labelled concepts (see ``world``),
and a tiny Llama 3 model trained on it that ships inside the package (``model_path()``)."""

from pathlib import Path

from llama_sae.tinyworld.bpe import LLAMA3_SPECIAL_TOKENS, train_bpe_tokenizer
from llama_sae.tinyworld.world import (
    FORMS,
    TOKEN_LEVEL_FORMS,
    TOPICS,
    Concept,
    DialogueRecord,
    DocRecord,
    Record,
    concepts,
    dialogues,
    documents,
    is_heldout,
    iter_sentences,
    label_text,
    neutral_prompts,
    sentences,
    topic_lemmas,
    topic_prompts,
    topic_words,
)


def _shipped(folder: str, marker: str, what: str, fix: str) -> Path:
    from llama_sae.errors import UserError

    path = Path(__file__).parent / folder
    if not (path / marker).exists():
        raise UserError(f"the shipped tinyworld {what} is missing from {path}: reinstall llama-sae, or {fix}")
    return path


def model_path() -> Path:
    """Directory of the shipped tiny model (Hugging Face format, with tokenizer and model card)."""
    return _shipped("model", "config.json", "model", "train one with `llama-sae tinyworld train --out DIR` and pass "
                    "--model DIR/model")


def sae_path() -> Path:
    """Directory of the shipped SAE on the tiny model's resid_post.5 (SAELens v6 layout; the demo trains its own at
    resid_post.3)."""
    return _shipped("sae", "cfg.json", "SAE", "train one with `llama-sae demo` and pass --sae runs/demo/sae")


def features_path() -> Path:
    """Directory of the shipped SAE's features artifact (top sentences, statistics, offline explanations)."""
    return Path(__file__).parent / "sae" / "features"


__all__ = [
    "model_path",
    "sae_path",
    "features_path",
    "FORMS",
    "LLAMA3_SPECIAL_TOKENS",
    "TOKEN_LEVEL_FORMS",
    "TOPICS",
    "Concept",
    "DialogueRecord",
    "DocRecord",
    "Record",
    "concepts",
    "dialogues",
    "documents",
    "is_heldout",
    "iter_sentences",
    "label_text",
    "neutral_prompts",
    "sentences",
    "topic_lemmas",
    "topic_prompts",
    "topic_words",
    "train_bpe_tokenizer",
]
