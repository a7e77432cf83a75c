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


def model_path() -> Path:
    """Directory of the shipped tiny model (Hugging Face format, with tokenizer and model card)."""
    from llama_sae.errors import UserError

    path = Path(__file__).parent / "model"
    if not (path / "config.json").exists():
        raise UserError(f"the shipped tinyworld model is missing from {path}: reinstall llama-sae, or train "
                        "one with `llama-sae tinyworld train --out DIR` and pass --model DIR/model")
    return path


__all__ = [
    "model_path",
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
