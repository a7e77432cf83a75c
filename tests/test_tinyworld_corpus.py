"""Tests for llama_sae.tinyworld's corpus: determinism, split disjointness, variety, exact labels and spans,
disjoint topic vocabularies, the topic labeller, documents, dialogues, prompts and the BPE tokenizer."""

from __future__ import annotations

import itertools
import json
import re
from collections import Counter

import pytest

from llama_sae import tinyworld
from llama_sae.tinyworld import vocab, world

N_LABEL = 30_000


@pytest.fixture(scope="module")
def sample() -> list[tinyworld.Record]:
    """Training sentences for the label checks."""
    return tinyworld.sentences(N_LABEL, seed=3)


def span_texts(r: tinyworld.Record, concept: str) -> list[str]:
    """The strings of ``r``'s spans of ``concept``."""
    return [r.text[s:e] for s, e in r.spans.get(concept, [])]


def covered(r: tinyworld.Record, concepts: tuple[str, ...], start: int, end: int) -> bool:
    """Whether [start, end) lies inside a span of one of ``concepts``."""
    return any(s <= start and end <= e for c in concepts for s, e in r.spans.get(c, []))


# ---------------------------------------------------------------------------------------------------------
# Concepts and vocabularies


def test_concepts():
    cs = tinyworld.concepts()
    names = [c.name for c in cs]
    assert len(cs) >= 40 and len(set(names)) == len(names)
    topics = [c for c in cs if c.kind == "topic"]
    forms = [c for c in cs if c.kind == "form"]
    assert len(topics) >= 25 and len(forms) >= 10
    assert {c.kind for c in cs} == {"topic", "form"}
    assert all(c.description for c in cs)
    assert [c.name for c in topics] == list(tinyworld.TOPICS)
    assert [c.name for c in forms] == list(tinyworld.FORMS)
    for name in ("cooking", "astronomy", "law", "chess", "diplomacy", "football"):
        assert name in tinyworld.TOPICS
    for name in ("question", "negation", "number", "date", "quotation", "past_tense", "comparison",
                 "person_name", "place_name", "plural", "imperative", "conditional"):
        assert name in tinyworld.FORMS


def test_topic_vocabularies_are_large_and_disjoint():
    for t in tinyworld.TOPICS:
        assert len(tinyworld.topic_lemmas(t)) >= 25, t
    for a, b in itertools.combinations(tinyworld.TOPICS, 2):
        assert not tinyworld.topic_words(a) & tinyworld.topic_words(b), (a, b)


def generic_words() -> set[str]:
    """Every word the templates use outside topic vocabularies (lower case)."""
    texts = [
        vocab.GENERIC_AGENTS, vocab.PERSON_ADJS, vocab.THING_ADJS, vocab.GENERIC_VERBS, vocab.CONTROL_VERBS,
        vocab.GERUND_VERBS, vocab.SPEECH_VERBS, vocab.DITRANSITIVE_VERBS, vocab.INTRANSITIVE_VERBS,
        vocab.OTHER_VERBS, " ".join(vocab.ADVERBS), " ".join(vocab.ADVERBS.values()),
        " ".join(vocab.TIME_PAST + vocab.TIME_PRESENT + vocab.TIME_FUTURE + vocab.TIME_ANY),
        " ".join(vocab.TIME_IMPERATIVE), " ".join(vocab.NUMBER_WORDS), " ".join(vocab.DURATION_UNITS),
        " ".join(vocab.MONEY_UNITS), " ".join(vocab.MONTHS), " ".join(vocab.WEEKDAYS),
        " ".join(vocab.FIRST_NAMES), " ".join(vocab.LAST_NAMES), " ".join(vocab.PLACE_NAMES),
        " ".join(world._QUOTE_INTROS), " ".join(world._SG_DETS + world._PL_DETS + world._MASS_DETS),
        " ".join(world._WH + world._SUB_CONJ), " ".join(vocab.NEUTRAL_PROMPTS),
    ]
    words = set(re.findall(r"[a-z]+", " ".join(texts).lower()))
    for v in world._ALL_VERBS:
        if v[0] not in world.WORD_TO_TOPIC:  # generic verbs: all their forms
            words.update(v)
    for sg, pl in world._GENERIC_AGENTS:
        words.update((sg, pl))
    words.update(
        "the a an and but so that to about for with by from on in at near beside next last every each if "
        "than more not never did does do will be is are was were won't don't didn't doesn't isn't aren't "
        "wasn't weren't there he she they we him her them us who what why how when where please times "
        "words sign poster motto note reading saying under".split()
    )
    return words


def test_generic_words_are_not_topic_words():
    overlap = generic_words() & set(world.WORD_TO_TOPIC)
    assert not overlap


def test_every_topic_word_in_text_is_labelled(sample):
    """A word of a topic's vocabulary never appears in a sentence without a span of that topic."""
    for r in sample:
        for m in re.finditer(r"[a-z]+", r.text.lower()):
            topic = world.WORD_TO_TOPIC.get(m.group())
            if topic is not None:
                assert covered(r, (topic,), m.start(), m.end()), (r.text, m.group())


# ---------------------------------------------------------------------------------------------------------
# Determinism, splits, variety


def test_deterministic():
    a = tinyworld.sentences(300, seed=0)
    b = tinyworld.sentences(300, seed=0)
    c = tinyworld.sentences(300, seed=1)
    assert [(r.id, r.text, r.concepts, r.spans) for r in a] == [(r.id, r.text, r.concepts, r.spans) for r in b]
    assert [r.text for r in a] != [r.text for r in c]
    assert [r.id for r in a] == list(range(300))
    it = tinyworld.iter_sentences(seed=0)
    assert [next(it).text for _ in range(300)] == [r.text for r in a]
    assert [d.text for d in tinyworld.documents(50, seed=0)] == [d.text for d in tinyworld.documents(50, seed=0)]
    assert [d.text for d in tinyworld.documents(50, seed=0)] != [d.text for d in tinyworld.documents(50, seed=1)]
    assert [d.messages for d in tinyworld.dialogues(50, seed=0)] == [
        d.messages for d in tinyworld.dialogues(50, seed=0)
    ]
    assert tinyworld.topic_prompts(seed=0) == tinyworld.topic_prompts(seed=0)


def test_bad_split():
    with pytest.raises(ValueError):
        tinyworld.sentences(1, split="test")


def split_sentences(text: str) -> list[str]:
    """Split a document or answer back into its sentences."""
    return re.split(r"(?<=[.?]) ", text)


def test_train_and_heldout_disjoint():
    train = {r.text for r in tinyworld.sentences(20_000, seed=0)}
    heldout = tinyworld.sentences(2_000, seed=0, split="heldout")
    assert not train & {r.text for r in heldout}
    assert not any(tinyworld.is_heldout(t) for t in train)
    assert all(tinyworld.is_heldout(r.text) for r in heldout)
    for d in tinyworld.documents(200, seed=0, split="heldout"):
        assert all(tinyworld.is_heldout(s) for s in split_sentences(d.text))
    for d in tinyworld.documents(200, seed=0):
        assert not any(tinyworld.is_heldout(s) for s in split_sentences(d.text))
    for d in tinyworld.dialogues(100, seed=0, split="heldout"):
        for m in d.messages:
            assert all(tinyworld.is_heldout(s) for s in split_sentences(m["content"]))


def test_variety():
    texts = [r.text for r in tinyworld.sentences(250_000, seed=0)]
    assert len(set(texts)) >= 200_000


# ---------------------------------------------------------------------------------------------------------
# Labels and spans

NUMBER_RE = re.compile(r"^(?:\d{1,3}(?:,\d{3})*|" + "|".join(vocab.NUMBER_WORDS) + ")$")
NUMERAL_IN_TEXT_RE = re.compile(r"\b(?:\d[\d,]*\d|\d|" + "|".join(vocab.NUMBER_WORDS) + r")\b", re.I)
MONTH = "(?:" + "|".join(vocab.MONTHS) + ")"
DAY = "(?:" + "|".join(vocab.WEEKDAYS) + ")"
DATE_RE = re.compile(
    rf"^(?:\d{{1,2}} {MONTH} \d{{4}}|{MONTH} \d{{1,2}}, \d{{4}}|\d{{4}}|{MONTH} \d{{4}}|{MONTH}|{DAY}s?"
    rf"|\d{{1,2}} {MONTH}|{MONTH} \d{{1,2}})$"
)
DATE_IN_TEXT_RE = re.compile(rf"\b(?:{MONTH}|{DAY}s?|\d{{4}})\b")
NEG_RE = re.compile(r"\b(?:not|never)\b|n't\b", re.I)
NEG_WORDS = {"not", "never", "didn't", "doesn't", "don't", "won't", "isn't", "aren't", "wasn't", "weren't"}
PLURAL_FORMS = {pl for t in world._TOPICS for _, pl in t.agents + t.things if pl} | {
    pl for _, pl in world._GENERIC_AGENTS
}


def test_spans_are_consistent(sample):
    for r in sample:
        assert r.concepts == tuple(sorted(r.spans))
        assert all(r.spans[c] for c in r.concepts)
        for spans in r.spans.values():
            for s, e in spans:
                assert 0 <= s < e <= len(r.text)
                assert r.text[s:e] == r.text[s:e].strip()
        assert set(r.concepts) <= set(tinyworld.TOPICS) | set(tinyworld.FORMS)
        assert set(r.topics) | set(r.forms) == set(r.concepts) and set(r.forms) <= set(tinyworld.FORMS)
        assert 1 <= len(r.topics) <= 2
        assert (r.text[0].isupper() or r.text[0].isdigit()) and r.text[-1] in ".?"
        assert "  " not in r.text and " ," not in r.text and " ." not in r.text


def test_topic_labels(sample):
    two = 0
    for r in sample:
        topics = set(r.topics)
        two += len(topics) == 2
        assert tinyworld.label_text(r.text) == topics, r.text
        for t in topics:
            for w in span_texts(r, t):
                assert w.lower() in tinyworld.topic_words(t)
    assert 0.05 < two / len(sample) < 0.15


def test_label_text_recovers_single_topic_sentences(sample):
    single = [r for r in sample if len(r.topics) == 1]
    hits = sum(tinyworld.label_text(r.text) == {r.topics[0]} for r in single)
    assert hits / len(single) >= 0.99
    assert tinyworld.label_text("The CHEFS simmered it.") == {"cooking"}
    assert tinyworld.label_text("Nothing here at all.") == set()
    assert tinyworld.label_text("a chef and an astronomer") == {"cooking", "astronomy"}


def test_question(sample):
    for r in sample:
        assert ("question" in r.concepts) == r.text.endswith("?")
        if "question" in r.concepts:
            assert r.spans["question"][-1] == (len(r.text) - 1, len(r.text))
            start = r.spans["question"][0][0]
            assert start == 0 or r.text[start - 2 : start] == ", "


def test_negation(sample):
    for r in sample:
        assert ("negation" in r.concepts) == bool(NEG_RE.search(r.text)), r.text
        assert all(w.lower() in NEG_WORDS for w in span_texts(r, "negation"))


def test_number_and_date(sample):
    for r in sample:
        for w in span_texts(r, "number"):
            assert NUMBER_RE.match(w.lower()), w
        for w in span_texts(r, "date"):
            assert DATE_RE.match(w), w
        for m in NUMERAL_IN_TEXT_RE.finditer(r.text):
            assert covered(r, ("number", "date"), m.start(), m.end()), (r.text, m.group())
        for s, e in r.spans.get("number", []):
            assert not covered(r, ("date",), s, e)
        assert ("date" in r.concepts) == bool(DATE_IN_TEXT_RE.search(r.text)), r.text
    counts = Counter(c for r in sample for c in r.concepts)
    assert counts["number"] > 0.03 * len(sample) and counts["date"] > 0.03 * len(sample)


def test_quotation(sample):
    for r in sample:
        assert ("quotation" in r.concepts) == ('"' in r.text)
        quotes = span_texts(r, "quotation")
        assert r.text.count('"') == 2 * len(quotes)
        for q in quotes:
            assert q[0] == q[-1] == '"' and '"' not in q[1:-1] and len(q) > 2


def test_past_tense(sample):
    for r in sample:
        words = set(re.findall(r"[a-z']+", r.text.lower()))
        has_past_word = bool(words & world.PAST_WORDS)
        assert ("past_tense" in r.concepts) == has_past_word, r.text
        for w in span_texts(r, "past_tense"):
            assert w.lower() in world.PAST_WORDS
        if "imperative" in r.concepts or "conditional" in r.concepts:
            assert "past_tense" not in r.concepts


def test_past_tense_main_verb_examples():
    seen = 0
    for r in tinyworld.sentences(3000, seed=5):
        if "past_tense" in r.concepts and "question" not in r.concepts:
            first = span_texts(r, "past_tense")[0]
            assert first.lower() in world.PAST_WORDS
            assert first.lower() not in world.BASE_VERBS
            seen += 1
    assert seen > 500


def test_comparison_conditional_imperative(sample):
    for r in sample:
        assert ("comparison" in r.concepts) == bool(re.search(r"\bthan\b", r.text)), r.text
        for w in span_texts(r, "comparison"):
            assert w.endswith(" than") and len(w.split()) in (2, 3)
        assert ("conditional" in r.concepts) == bool(re.search(r"\bif\b", r.text, re.I)), r.text
        assert all(w.lower() == "if" for w in span_texts(r, "conditional"))
        if "imperative" in r.concepts:
            assert "question" not in r.concepts and "past_tense" not in r.concepts
            (verb,) = span_texts(r, "imperative")
            assert verb.lower() in world.BASE_VERBS
            s, _ = r.spans["imperative"][0]
            before = r.text[:s].lower().split()
            assert not before or before[-1] in ("please", "never", "not", "don't") or before[-1].endswith(",")


def test_names_and_places(sample):
    name_re = re.compile(r"\b(?:" + "|".join(sorted(world.PERSON_NAME_WORDS)) + r")\b")
    place_re = re.compile(r"\b(?:" + "|".join(sorted(world.PLACE_NAMES, key=len, reverse=True)) + r")\b")
    for r in sample:
        for n in span_texts(r, "person_name"):
            first, *last = n.split(" ")
            assert first in vocab.FIRST_NAMES and len(last) <= 1 and all(x in vocab.LAST_NAMES for x in last)
        for m in name_re.finditer(r.text):
            assert covered(r, ("person_name",), m.start(), m.end()), r.text
        for p in span_texts(r, "place_name"):
            assert p in world.PLACE_NAMES
        for m in place_re.finditer(r.text):
            assert covered(r, ("place_name",), m.start(), m.end()), r.text


def test_plural(sample):
    for r in sample:
        for np in span_texts(r, "plural"):
            words = set(np.lower().split())
            assert words & (PLURAL_FORMS | {"they", "we", "and"}), (r.text, np)


def test_articles(sample):
    for r in sample:
        for m in re.finditer(r"\b([Aa]n?) ([a-z]+)", r.text):
            art, word = m.groups()
            assert (art.lower() == "an") == (word[0] in "aeiou" and word not in ("useful",)), r.text


def test_every_concept_occurs(sample):
    counts = Counter(c for r in sample for c in r.concepts)
    for c in tinyworld.concepts():
        assert counts[c.name] >= 50, c.name


# ---------------------------------------------------------------------------------------------------------
# Documents, dialogues, prompts


def test_documents():
    docs = tinyworld.documents(300, seed=2)
    assert [d.id for d in docs] == list(range(300))
    for d in docs:
        parts = split_sentences(d.text)
        assert 2 <= len(parts) <= 5
        assert d.topic in d.concepts and d.concepts == tuple(sorted(d.spans))
        for c, spans in d.spans.items():
            for s, e in spans:
                if c in tinyworld.TOPICS:
                    assert d.text[s:e].lower() in tinyworld.topic_words(c)
        assert set(c for c in d.concepts if c in tinyworld.TOPICS) == tinyworld.label_text(d.text)
    mostly_one = sum(len(tinyworld.label_text(d.text)) == 1 for d in docs)
    assert mostly_one > 0.6 * len(docs)


def test_dialogues():
    for d in tinyworld.dialogues(300, seed=2):
        roles = [m["role"] for m in d.messages]
        assert roles in (["user", "assistant"], ["user", "assistant"] * 2)
        for m in d.messages:
            assert set(m) == {"role", "content"} and m["content"]
            assert tinyworld.label_text(m["content"]) == {d.topic}
            if m["role"] == "user":
                assert m["content"].endswith("?")
            else:
                assert 1 <= len(split_sentences(m["content"])) <= 3
                assert not m["content"].endswith("?")


def test_prompts():
    prompts = tinyworld.topic_prompts(seed=0)
    assert {t for _, t in prompts} == set(tinyworld.TOPICS)
    for p, t in prompts:
        assert tinyworld.label_text(p) == {t}
    assert tinyworld.topic_prompts(seed=1) != prompts
    neutral = tinyworld.neutral_prompts()
    assert len(neutral) >= 5 and "The" in neutral and "Yesterday," in neutral
    for p in neutral:
        assert tinyworld.label_text(p) == set()


def test_prompts_open_real_sentences(sample):
    """Generated text starts with each kind of prompt, so greedy continuations are in distribution."""
    starts = Counter(r.text.split(" ")[0] for r in sample)
    for p in ("The", "Yesterday,", "They", "She", "There"):
        assert starts[p] > 0, p
    texts = [r.text for r in sample]
    for p in ("In the morning,", "Every day,", "Last week,", "Tomorrow,", "Why did", "My friend"):
        assert any(t.startswith(p) for t in texts), p


# ---------------------------------------------------------------------------------------------------------
# BPE tokenizer


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    texts = [r.text for r in tinyworld.sentences(20_000, seed=0)]
    texts += [m["content"] for d in tinyworld.dialogues(500, seed=0) for m in d.messages]
    out = tmp_path_factory.mktemp("bpe")
    path = tinyworld.train_bpe_tokenizer(texts, out, vocab_size=1024)
    assert path == out / "tokenizer.json"
    return out


def test_bpe_files_and_special_tokens(bpe_dir):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(bpe_dir / "tokenizer.json"))
    for i, name in enumerate(tinyworld.LLAMA3_SPECIAL_TOKENS):
        assert tok.token_to_id(name) == i
    specials = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
    assert specials == set(tinyworld.LLAMA3_SPECIAL_TOKENS)
    assert 500 < tok.get_vocab_size() <= 1024
    config = json.loads((bpe_dir / "tokenizer_config.json").read_text())
    assert config["bos_token"] == "<|begin_of_text|>" and config["eos_token"] == "<|end_of_text|>"
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and "chat_template" in config
    assert json.loads((bpe_dir / "special_tokens_map.json").read_text())["bos_token"] == "<|begin_of_text|>"
    assert not [p for p in bpe_dir.iterdir() if p.name.endswith(".tmp")]
    assert tok.encode("The chef", add_special_tokens=True).ids[0] == 0


def test_bpe_is_deterministic(tmp_path):
    texts = [r.text for r in tinyworld.sentences(3000, seed=4)]
    a = tinyworld.train_bpe_tokenizer(texts, tmp_path / "a", vocab_size=600)
    b = tinyworld.train_bpe_tokenizer(iter(texts), tmp_path / "b", vocab_size=600)
    assert a.read_bytes() == b.read_bytes()
    with pytest.raises(ValueError):
        tinyworld.train_bpe_tokenizer(texts, tmp_path / "c", vocab_size=100)


def test_bpe_round_trip(bpe_dir):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(bpe_dir / "tokenizer.json"))
    texts = [r.text for r in tinyworld.sentences(500, seed=9, split="heldout")]
    texts += ["naïve café 🦙 — ünïcödé", "  two  spaces\nand a newline\t", "x" * 50]
    for t in texts:
        ids = tok.encode(t, add_special_tokens=False).ids
        assert tok.decode(ids, skip_special_tokens=False) == t
    short = sum(len(tok.encode(t, add_special_tokens=False).ids) for t in texts[:500])
    assert short < 0.4 * sum(len(t) for t in texts[:500])  # real merges, not bytes


def test_bpe_loads_as_llama_tokenizer(bpe_dir):
    from llama_sae.llama.tokenizer import load_tokenizer

    tok = load_tokenizer(bpe_dir)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.eot_id) == (0, 1, 4, 9)
    text = "Did the chef simmer the sauce?"
    assert tok.decode(tok.encode(text, bos=False)) == text
    messages = [{"role": "user", "content": "Why did the chef stir the soup?"}]
    chat = tok.decode(tok.encode_chat(messages))
    assert chat == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhy did the chef stir the soup?"
        "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    jinja2 = pytest.importorskip("jinja2")
    template = json.loads((bpe_dir / "tokenizer_config.json").read_text())["chat_template"]
    rendered = jinja2.Template(template).render(
        messages=messages, bos_token="<|begin_of_text|>", add_generation_prompt=True
    )
    assert rendered == chat
