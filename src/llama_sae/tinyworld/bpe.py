"""A small byte-level BPE tokenizer in Llama 3 format, trained on tinyworld text.

The tokenizer splits text with Meta's Llama 3 regex, then maps bytes to characters as GPT-2 does
(ByteLevel, ``add_prefix_space=False``), like the ``tokenizer.json`` of Llama 3. The 11 named Llama 3
special tokens take ids 0..10, in Llama order, so ``<|begin_of_text|>`` is 0, ``<|eot_id|>`` is 9.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from llama_sae.fileio import atomic_write, atomic_write_json
from llama_sae.llama.tokenizer import LLAMA3_CHAT_TEMPLATE, LLAMA3_PAT_STR

LLAMA3_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|reserved_special_token_2|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
)
BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>"

def train_bpe_tokenizer(texts: Iterable[str], out_dir: str | Path, *, vocab_size: int = 4096) -> Path:
    """Train a byte-level BPE on ``texts`` and save it in Hugging Face format in ``out_dir``.

    Writes ``tokenizer.json``, ``tokenizer_config.json`` (BOS ``<|begin_of_text|>``, EOS
    ``<|end_of_text|>``, pad ``<|finetune_right_pad_id|>``, a Llama 3 chat template) and
    ``special_tokens_map.json``, each atomically. The special tokens of ``LLAMA3_SPECIAL_TOKENS`` get
    ids 0..10. Like Llama 3's ``tokenizer.json``, the post-processor prepends ``<|begin_of_text|>`` when
    ``add_special_tokens=True``. The vocabulary may come out smaller than ``vocab_size`` when the text
    allows fewer merges. Returns the path of ``tokenizer.json``.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if vocab_size < len(LLAMA3_SPECIAL_TOKENS) + 256:
        raise ValueError(f"vocab_size must be at least {len(LLAMA3_SPECIAL_TOKENS) + 256}, got {vocab_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_PAT_STR), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(LLAMA3_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1", special_tokens=[(BOS, bos_id)]
            ),
        ]
    )
    for i, name in enumerate(LLAMA3_SPECIAL_TOKENS):
        if tok.token_to_id(name) != i:
            raise RuntimeError(f"special token {name} got id {tok.token_to_id(name)}, expected {i}")

    special_map = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
    config = {
        **special_map,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 1_000_000,
        "clean_up_tokenization_spaces": False,
        "chat_template": LLAMA3_CHAT_TEMPLATE,
    }
    path = out / "tokenizer.json"
    atomic_write_json(out / "tokenizer_config.json", config)
    atomic_write_json(out / "special_tokens_map.json", special_map)
    atomic_write(path, tok.to_str(pretty=True))  # last: a run that sees it knows the other two are there
    return path
