"""tinyworld: English sentences with planted concepts whose truth is known.

Every sentence is built from a topic vocabulary (30 topics such as cooking, astronomy or law, each with
its own agents, things, places, verbs and adjectives that no other topic shares) plus generic template
words, and may carry any of 12 grammatical or lexical *forms* (question, negation, number, date,
quotation, past_tense, comparison, person_name, place_name, plural, imperative, conditional).

Labels are exact by construction: the generator records a character span for every word or phrase that
realises a concept, and a sentence is labelled with a concept **iff** it has at least one span of it.

* topic: a word of that topic's vocabulary (spans: each topic word). Most sentences have one topic,
  about 10% have two.
* question: the sentence ends with "?" (spans: the leading wh-word or auxiliary, and the "?").
* negation: "not", "never" or an "n't" contraction appears (spans: those words).
* number: a numeral that is not part of a date: "three", "42", "1,200" (spans: the numeral).
* date: a calendar expression: "12 March 1998", "March 12, 1998", "2004", "March", "Monday(s)"
  (spans exclude the preposition and "last"/"next"/"every"; a year is a date, never a number).
  "yesterday", "tomorrow", "in the morning" are not dates.
* quotation: a double-quoted phrase (spans include both quote marks).
* past_tense: the finite verbs are in the past tense (spans: each finite past verb or past auxiliary:
  "simmered", "did", "didn't", "was", "were"). Imperatives and conditionals are never past.
* comparison: a comparative with "than" (spans: "spicier than", "more carefully than", "more onions than").
* person_name / place_name: a name from ``vocab.FIRST_NAMES``/``LAST_NAMES`` or ``vocab.PLACE_NAMES``.
* plural: the grammatical subject of some finite clause is plural (spans: those subject noun phrases,
  including "there are" subjects); plural objects alone do not count.
* imperative: the main clause is a command (spans: the imperative verb).
* conditional: an "if" clause (spans: the word "if").

Train and heldout splits are disjoint as sets of sentences: a sentence belongs to the heldout split iff
``zlib.crc32`` of its UTF-8 text is divisible by 10, and documents and dialogues only use sentences of
their own split.
"""

from __future__ import annotations

import gc
import random
import re
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from llama_sae.tinyworld import vocab as _v

# ---------------------------------------------------------------------------------------------------------
# Concepts

FORMS: tuple[str, ...] = (
    "question",
    "negation",
    "number",
    "date",
    "quotation",
    "past_tense",
    "comparison",
    "person_name",
    "place_name",
    "plural",
    "imperative",
    "conditional",
)
TOKEN_LEVEL_FORMS: tuple[str, ...] = ("number", "date", "quotation", "person_name", "place_name")

_FORM_DESCRIPTIONS = {
    "question": 'The sentence is a question ending in "?" (yes/no, wh-, "what" and "who" questions).',
    "negation": 'The sentence contains a negation: "not", "never" or an "n\'t" contraction.',
    "number": 'A numeral outside dates: a number word ("three") or digits ("42", "1,200").',
    "date": 'A calendar date, month, weekday or year ("12 March 1998", "in 2004", "on Monday").',
    "quotation": "A phrase in double quotes.",
    "past_tense": "The finite verbs of the sentence are in the past tense.",
    "comparison": 'A comparative construction with "than" ("spicier than", "more carefully than").',
    "person_name": "A person's name (first name, or first and last name).",
    "place_name": "The name of a city or country.",
    "plural": "The grammatical subject of a clause is plural.",
    "imperative": "The main clause is a command with no subject.",
    "conditional": 'The sentence contains an "if" clause.',
}

_PAST, _NEG, _Q, _NUM, _DATE = "past_tense", "negation", "question", "number", "date"
_QUOTE, _CMP, _PERSON, _PLACE, _PLURAL = "quotation", "comparison", "person_name", "place_name", "plural"
_IMP, _COND = "imperative", "conditional"


@dataclass(frozen=True)
class Concept:
    """A planted concept: ``kind`` is "topic" or "form"."""

    name: str
    kind: str
    description: str


@dataclass(slots=True)
class Record:
    """One sentence with its concept labels.

    ``concepts`` are the sorted names of every concept present; ``spans`` maps each of them to the
    ``[start, end)`` character spans in ``text`` that realise it (every label has at least one span).
    """

    id: int
    text: str
    concepts: tuple[str, ...]
    spans: dict[str, list[tuple[int, int]]]

    @property
    def topics(self) -> tuple[str, ...]:
        """The topic concepts of the sentence."""
        return tuple(c for c in self.concepts if c in TOPIC_SET)

    @property
    def forms(self) -> tuple[str, ...]:
        """The form concepts of the sentence."""
        return tuple(c for c in self.concepts if c not in TOPIC_SET)


@dataclass(slots=True)
class DocRecord:
    """A short document of 2-5 sentences; ``topic`` is its main topic, ``spans`` index into ``text``."""

    id: int
    text: str
    topic: str
    concepts: tuple[str, ...]
    spans: dict[str, list[tuple[int, int]]]


@dataclass(slots=True)
class DialogueRecord:
    """A chat: the user asks about ``topic`` and the assistant answers with on-topic sentences."""

    id: int
    topic: str
    messages: list[dict[str, str]]


# ---------------------------------------------------------------------------------------------------------
# Word forms


def _plural(w: str) -> str:
    if w.endswith(("s", "sh", "ch", "x", "z")):
        return w + "es"
    if w.endswith("y") and w[-2] not in "aeiou":
        return w[:-1] + "ies"
    return w + "s"


def _noun(spec: str) -> tuple[str, str | None]:
    """Return (singular, plural); plural is None for an uncountable noun."""
    if spec.startswith("~"):
        return spec[1:], None
    if ":" in spec:
        sg, pl = spec.split(":")
        return sg, pl
    return spec, _plural(spec)


# Verb tuples: (base, 3rd person singular, past, -ing, past participle)
_BASE, _S3, _PASTF, _ING, _PP = 0, 1, 2, 3, 4


def _verb(spec: str) -> tuple[str, str, str, str, str]:
    parts = spec.split(":")
    b = parts[0]
    double = b.endswith("*")
    b = b.rstrip("*")
    if b.endswith(("s", "sh", "ch", "x", "z", "o")):
        s3 = b + "es"
    elif b.endswith("y") and b[-2] not in "aeiou":
        s3 = b[:-1] + "ies"
    else:
        s3 = b + "s"
    if double:
        past, ing = b + b[-1] + "ed", b + b[-1] + "ing"
    else:
        if b.endswith("e"):
            past = b + "d"
        elif b.endswith("y") and b[-2] not in "aeiou":
            past = b[:-1] + "ied"
        else:
            past = b + "ed"
        if b.endswith("ie"):
            ing = b[:-2] + "ying"
        elif b.endswith("e") and not b.endswith(("ee", "ye", "oe")):
            ing = b[:-1] + "ing"
        else:
            ing = b + "ing"
    if len(parts) == 3:
        past, pp = parts[1], parts[2]
    else:
        pp = past
    return (b, s3, past, ing, pp)


def _adj(spec: str) -> tuple[str, tuple[str, ...] | None]:
    """Return (adjective, comparative words or None when not gradable)."""
    if ":" not in spec:
        return spec, None
    w, c = spec.split(":")
    return w, (("more", w) if c == "+" else (c,))


def _place(spec: str) -> tuple[str, str]:
    if ":" in spec:
        prep, w = spec.split(":")
        return prep, w
    return "in", spec


class _Topic:
    __slots__ = ("name", "description", "agents", "things", "places", "verbs", "adjs", "gradable", "words")

    def __init__(self, name: str, data: dict[str, str]):
        self.name = name
        self.description = data["description"]
        self.agents = [_noun(s) for s in data["agents"].split()]
        self.things = [_noun(s) for s in data["things"].split()]
        self.places = [_place(s) for s in data["places"].split()]
        self.verbs = [_verb(s) for s in data["verbs"].split()]
        self.adjs = [_adj(s) for s in data["adjs"].split()]
        self.gradable = [a for a in self.adjs if a[1] is not None]
        words: set[str] = set()
        for sg, pl in self.agents + self.things:
            words.add(sg)
            if pl:
                words.add(pl)
        words.update(w for _, w in self.places)
        for v in self.verbs:
            words.update(v)
        for a, c in self.adjs:
            words.add(a)
            if c is not None:
                words.add(c[-1])
        self.words = frozenset(words)


_TOPICS: list[_Topic] = [_Topic(n, d) for n, d in _v.TOPIC_DATA.items()]
TOPICS: tuple[str, ...] = tuple(t.name for t in _TOPICS)
TOPIC_SET = frozenset(TOPICS)
_TOPIC_BY_NAME = {t.name: t for t in _TOPICS}

# Every surface form of a topic word -> topic name (lower case).
WORD_TO_TOPIC: dict[str, str] = {w: t.name for t in _TOPICS for w in sorted(t.words)}


def topic_words(topic: str) -> frozenset[str]:
    """Every surface form (lower case) of the vocabulary of ``topic``: singular, plural, verb forms."""
    return _TOPIC_BY_NAME[topic].words


def topic_lemmas(topic: str) -> frozenset[str]:
    """The dictionary forms of the vocabulary of ``topic`` (nouns, verbs, adjectives, places)."""
    t = _TOPIC_BY_NAME[topic]
    return frozenset(
        [sg for sg, _ in t.agents + t.things] + [w for _, w in t.places] + [v[0] for v in t.verbs]
        + [a for a, _ in t.adjs]
    )


_GENERIC_AGENTS = [_noun(s) for s in _v.GENERIC_AGENTS.split()]
_PERSON_ADJS = [_adj(s) for s in _v.PERSON_ADJS.split()]
_PERSON_GRADABLE = [a for a in _PERSON_ADJS if a[1] is not None]
_THING_ADJS = [_adj(s) for s in _v.THING_ADJS.split()]
_THING_GRADABLE = [a for a in _THING_ADJS if a[1] is not None]
_GENERIC_VERBS = [_verb(s) for s in _v.GENERIC_VERBS.split()]
_CONTROL_VERBS = [_verb(s) for s in _v.CONTROL_VERBS.split()]
_GERUND_VERBS = [_verb(s) for s in _v.GERUND_VERBS.split()]
_SPEECH_VERBS = [_verb(s) for s in _v.SPEECH_VERBS.split()]
_DITRANSITIVE_VERBS = [_verb(s) for s in _v.DITRANSITIVE_VERBS.split()]
_INTRANSITIVE_VERBS = [_verb(s) for s in _v.INTRANSITIVE_VERBS.split()]
_TELL, _HELP, _SPEND = (_verb(s) for s in _v.OTHER_VERBS.split())
_ADVERBS = list(_v.ADVERBS.items())
_FULL_NAMES = [f"{f} {last}" for f in _v.FIRST_NAMES for last in _v.LAST_NAMES]

_ALL_VERBS = (
    [v for t in _TOPICS for v in t.verbs] + _GENERIC_VERBS + _CONTROL_VERBS + _GERUND_VERBS + _SPEECH_VERBS
    + _DITRANSITIVE_VERBS + _INTRANSITIVE_VERBS + [_TELL, _HELP, _SPEND]
)
# Words that mark a finite past verb (past forms, past auxiliaries, and participles, which tinyworld only
# uses in past passives).
PAST_WORDS: frozenset[str] = frozenset(
    [v[_PASTF] for v in _ALL_VERBS] + [v[_PP] for v in _ALL_VERBS]
    + ["did", "didn't", "was", "were", "wasn't", "weren't"]
)
BASE_VERBS: frozenset[str] = frozenset(v[_BASE] for v in _ALL_VERBS)
PERSON_NAME_WORDS: frozenset[str] = frozenset(_v.FIRST_NAMES + _v.LAST_NAMES)
PLACE_NAMES: frozenset[str] = frozenset(_v.PLACE_NAMES)

_A_EXCEPTIONS = frozenset({"useful", "uniform", "unique", "unit", "user", "usual", "european"})


def _a(word: str) -> str:
    return "an" if word[0] in "aeiou" and word not in _A_EXCEPTIONS else "a"


# ---------------------------------------------------------------------------------------------------------
# Token lists.  A token is (op, text, tag): op 0 = word (space before), 1 = attached punctuation,
# 2 = open a span group for tag, 3 = close it, 4 = opening quote (the next word attaches to it),
# 5 = coordinated verb placeholder (text holds the verb tuple, resolved by _Gen.realize).
# tag is None, a concept name, or a tuple of concept names.

_SG_DETS = ("the", "the", "the", "the", "the", "a", "a", "this", "that", "my", "our", "their", "his", "her")
_PL_DETS = ("the", "the", "the", "", "", "these", "those", "some", "many", "several", "our", "their", "my")
_MASS_DETS = ("the", "the", "the", "some", "this", "that", "our", "my", "their", "his", "her", "")
_INDEF_PL = ("some", "many", "several", "", "")
_NEG_DECL = ("not", "nt", "never")
_NEG_Q = ("nt", "nt", "never")
_WH = ("why", "why", "how", "when", "where")
_SUB_CONJ = ("because", "while", "after", "before", "when")
_QUOTE_INTROS = ("under a sign reading", "with the words", "next to a poster saying", "under the motto",
                 "with a note reading")

# Predicate templates (weights by repetition).
_AGENT_PREDS = frozenset(
    "tv gv iv ctrl ger tell ditr help spend coord rel speech copNP copLoc prog cmpAdv cmpQty copAdjA "
    "cmpAdjA".split()
)
_VERB_PREDS = frozenset("tv gv iv ctrl ger tell ditr help spend coord rel speech cmpAdv cmpQty".split())
_WHAT_PREDS = frozenset("tv gv ctrl ger ditr help spend prog".split())
_LOC_PREDS = frozenset("iv copLoc thingLoc there".split())
_FRONTABLE = frozenset(("loc", "place", "date", "time"))
_PRED_TABLE = (
    ["tv"] * 10 + ["gv"] * 5 + ["iv"] * 2 + ["ctrl"] * 2 + ["ger"] * 2 + ["tell"] + ["ditr"] * 2 + ["help"]
    + ["spend"] + ["coord"] * 2 + ["rel"] * 2 + ["speech"] * 2 + ["copNP"] + ["copLoc"] + ["prog"] * 2
    + ["cmpAdv"] + ["cmpQty"] + ["copAdjA"] + ["cmpAdjA"] + ["copAdj"] * 3 + ["cmpAdj"] * 2 + ["thingLoc"]
    + ["pass"] * 2 + ["there"] * 2
)
_SIMPLE_AGENT_PREDS = ("tv", "tv", "gv", "iv", "prog", "copAdjA")
_SIMPLE_THING_PREDS = ("copAdj", "thingLoc")
PREDICATE_TEMPLATES: tuple[str, ...] = tuple(sorted(set(_PRED_TABLE)))
SENTENCE_FRAMES: tuple[str, ...] = (
    "declarative", "fronted-adjunct declarative", "declarative + subordinate clause", "compound declarative",
    "yes/no question", "wh-question", "what-question", "who-question", "imperative", "if-first conditional",
    "if-last conditional",
)


def _tags(a: str | None, b: str | None) -> str | tuple[str, str] | None:
    if a is None:
        return b
    if b is None:
        return a
    return (a, b)


def _emit(toks: list[tuple]) -> tuple[str, dict[str, list[tuple[int, int]]]]:
    """Join tokens into text and collect the spans of their tags."""
    parts: list[str] = []
    pos = 0
    glue = True
    spans: dict[str, list[tuple[int, int]]] = {}
    opens: dict[str, list[int]] = {}
    for op, s, tag in toks:
        if op == 0:
            if glue:
                glue = False
            else:
                parts.append(" ")
                pos += 1
            start = pos
            parts.append(s)
            pos += len(s)
        elif op == 1:
            start = pos
            parts.append(s)
            pos += len(s)
        elif op == 2:
            opens.setdefault(tag, []).append(pos if glue else pos + 1)
            continue
        elif op == 3:
            spans.setdefault(tag, []).append((opens[tag].pop(), pos))
            continue
        else:  # opening quote
            if not glue:
                parts.append(" ")
                pos += 1
            parts.append('"')
            pos += 1
            glue = True
            continue
        if tag is not None:
            if tag.__class__ is str:
                spans.setdefault(tag, []).append((start, pos))
            else:
                for t in tag:
                    spans.setdefault(t, []).append((start, pos))
    text = "".join(parts)
    for v in spans.values():
        v.sort()
    return text[0].upper() + text[1:], spans


class _Pred:
    __slots__ = ("kind", "verb", "vtag", "pre", "obj", "rest", "loc", "coord")

    def __init__(self, kind, verb=None, vtag=None, pre=(), obj=None, rest=(), loc=False, coord=False):
        self.kind = kind  # "v" lexical verb, "be" copula, "prog" be + V-ing, "pass" be + participle
        self.verb = verb
        self.vtag = vtag
        self.pre = list(pre)  # between the verb and the object
        self.obj = obj  # direct object (removed in "what" questions)
        self.rest = list(rest)
        self.loc = loc
        self.coord = coord


_PRED_TABLES: dict[tuple, list[str]] = {}


def _pred_table(mood: str, past: bool, qkind: str | None, wh: str | None) -> list[str]:
    """The weighted predicate templates that fit a clause (cached)."""
    key = (mood, past, qkind, wh)
    table = _PRED_TABLES.get(key)
    if table is None:
        table = [
            name for name in _PRED_TABLE
            if not (mood == "imp" and name not in _VERB_PREDS)
            and not (name == "pass" and not past)
            and not (qkind == "what" and name not in _WHAT_PREDS)
            and not (qkind == "who" and name not in _AGENT_PREDS)
            and not (wh == "where" and name in _LOC_PREDS)
            and not (wh == "how" and name not in _VERB_PREDS)
        ]
        _PRED_TABLES[key] = table
    return table


class _Gen:
    """The sentence generator; all randomness comes from one ``random.Random``."""

    def __init__(self, rng: random.Random):
        self.rand = rng.random
        self.A: _Topic = _TOPICS[0]
        self.B: _Topic | None = None
        self.hero: str | None = None

    def ch(self, seq):
        return seq[int(self.rand() * len(seq))]

    def tp(self) -> _Topic:
        """The topic for a secondary slot: A, or B half the time in a two-topic sentence."""
        if self.B is not None and self.rand() < 0.5:
            return self.B
        return self.A

    # -- small phrases ------------------------------------------------------------------------------------

    def num(self) -> str:
        r = self.rand()
        if r < 0.5:
            return self.ch(_v.NUMBER_WORDS)
        if r < 0.82:
            return str(2 + int(self.rand() * 98))
        if r < 0.94:
            return str(100 + int(self.rand() * 900))
        return f"{1000 + int(self.rand() * 99000):,}"

    def name(self) -> str:
        if self.hero is not None and self.rand() < 0.6:
            return self.hero
        if self.rand() < 0.7:
            return self.ch(_FULL_NAMES)
        return self.ch(_v.FIRST_NAMES)

    def date(self, tense: str | None) -> list[tuple]:
        r = self.rand()
        ch = self.ch
        month, day = ch(_v.MONTHS), ch(_v.WEEKDAYS)
        if tense == "past":
            year = str(1850 + int(self.rand() * 175))
            d = str(1 + int(self.rand() * 28))
            if r < 0.2:
                return [(0, "on", None), (0, f"{d} {month} {year}", _DATE)]
            if r < 0.35:
                return [(0, "on", None), (0, f"{month} {d}, {year}", _DATE)]
            if r < 0.55:
                return [(0, "in", None), (0, year, _DATE)]
            if r < 0.7:
                return [(0, "in", None), (0, f"{month} {year}", _DATE)]
            if r < 0.82:
                return [(0, "last", None), (0, day, _DATE)]
            if r < 0.92:
                return [(0, "on", None), (0, day, _DATE)]
            return [(0, "in", None), (0, month, _DATE)]
        if tense == "pres":
            if r < 0.35:
                return [(0, "on", None), (0, day + "s", _DATE)]
            if r < 0.7:
                return [(0, "every", None), (0, day, _DATE)]
            return [(0, "in", None), (0, month, _DATE)]
        # future or imperative
        d = str(1 + int(self.rand() * 28))
        if r < 0.3:
            return [(0, "next", None), (0, day, _DATE)]
        if r < 0.55:
            return [(0, "on", None), (0, day, _DATE)]
        if r < 0.7:
            return [(0, "on", None), (0, f"{d} {month}", _DATE)]
        if r < 0.85:
            return [(0, "on", None), (0, f"{month} {d}", _DATE)]
        return [(0, "in", None), (0, month, _DATE)]

    def time(self, tense: str | None) -> list[tuple]:
        ch = self.ch
        if tense is None:
            s = ch(_v.TIME_IMPERATIVE)
        elif self.rand() < 0.3:
            s = ch(_v.TIME_ANY)
        elif tense == "past":
            s = ch(_v.TIME_PAST)
        elif tense == "pres":
            s = ch(_v.TIME_PRESENT)
        else:
            s = ch(_v.TIME_FUTURE)
        return [(0, s, None)]

    def place_phrase(self, t: _Topic) -> list[tuple]:
        prep, w = self.ch(t.places)
        return [(0, prep, None), (0, "the", None), (0, w, t.name)]

    def place_name_phrase(self) -> list[tuple]:
        return [(0, "near" if self.rand() < 0.25 else "in", None), (0, self.ch(_v.PLACE_NAMES), _PLACE)]

    def quote(self, t: _Topic) -> list[tuple]:
        ch, rand = self.ch, self.rand
        out: list[tuple] = [(2, "", _QUOTE), (4, "", None)]
        r = rand()
        noun = ch(t.things)[0]
        if r < 0.35:
            if rand() < 0.6:
                out.append((0, ch(t.adjs)[0], t.name))
            else:
                out.append((0, ch(_THING_ADJS)[0], None))
            out.append((0, noun, t.name))
        elif r < 0.65:
            out += [(0, ch(t.verbs)[_BASE], t.name), (0, "the", None), (0, noun, t.name)]
        elif r < 0.8:
            out.append((0, noun, t.name))
        else:
            out += [(0, noun, t.name), (0, "and", None), (0, ch(t.things)[0], t.name)]
        out += [(1, '"', None), (3, "", _QUOTE)]
        return out

    # -- noun phrases -------------------------------------------------------------------------------------

    def adj_for_thing(self, t: _Topic) -> tuple[str, str | None]:
        if self.rand() < 0.6:
            return self.ch(t.adjs)[0], t.name
        return self.ch(_THING_ADJS)[0], None

    def agent_np(self, t: _Topic, subj: bool = True, plural: bool | None = None,
                 pronoun: bool = True) -> tuple[list[tuple], bool]:
        """An agent noun phrase of topic ``t`` (or a name, pronoun or generic person)."""
        rand, ch = self.rand, self.ch
        if plural is None:
            plural = rand() < 0.3
        r = rand()
        if not plural:
            if r < 0.26 or (self.hero is not None and r < 0.5):
                return [(0, self.name(), _PERSON)], False
            if r < 0.33 and pronoun:
                if subj:
                    return [(0, "she" if rand() < 0.5 else "he", None)], False
                return [(0, "her" if rand() < 0.5 else "him", None)], False
            if r < 0.39 and subj:
                toks = [(0, self.name(), _PERSON), (1, ",", None)]
                if rand() < 0.5:
                    a = ch(_PERSON_ADJS)[0]
                    toks += [(0, _a(a), None), (0, a, None)]
                else:
                    toks.append((0, "the", None))
                toks += [(0, ch(t.agents)[0], t.name), (1, ",", None)]
                return toks, False
            if r < 0.45:
                return [(0, "the", None), (0, ch(t.agents)[0], t.name), (0, "from", None),
                        (0, ch(_v.PLACE_NAMES), _PLACE)], False
            if rand() < 0.15:
                noun, tag = ch(_GENERIC_AGENTS)[0], None
            else:
                noun, tag = ch(t.agents)[0], t.name
            toks = []
            first = noun
            adj = None
            if rand() < 0.25:
                adj = ch(_PERSON_ADJS)[0]
                first = adj
            det = ch(_SG_DETS)
            toks.append((0, _a(first) if det == "a" else det, None))
            if adj is not None:
                toks.append((0, adj, None))
            toks.append((0, noun, tag))
            return toks, False
        # plural
        if r < 0.15:
            toks = [(0, self.num(), _NUM)]
        elif r < 0.25 and pronoun:
            if subj:
                return [(0, "they" if rand() < 0.6 else "we", None)], True
            return [(0, "them" if rand() < 0.6 else "us", None)], True
        elif r < 0.38:
            n1 = self.name()
            toks = [(0, n1, _PERSON), (0, "and", None)]
            if rand() < 0.5:
                n2 = self.name()
                while n2 == n1:
                    n2 = ch(_FULL_NAMES)
                toks.append((0, n2, _PERSON))
            else:
                toks += [(0, "the", None), (0, ch(t.agents)[0], t.name)]
            return toks, True
        elif r < 0.45:
            return [(0, "the", None), (0, ch(t.agents)[1], t.name), (0, "from", None),
                    (0, ch(_v.PLACE_NAMES), _PLACE)], True
        else:
            det = ch(_PL_DETS)
            toks = [(0, det, None)] if det else []
        if rand() < 0.25:
            toks.append((0, ch(_PERSON_ADJS)[0], None))
        if rand() < 0.15:
            toks.append((0, ch(_GENERIC_AGENTS)[1], None))
        else:
            toks.append((0, ch(t.agents)[1], t.name))
        return toks, True

    def thing_np(self, t: _Topic, plural: bool | None = None, indef: bool = False,
                 poss: bool = True) -> tuple[list[tuple], bool]:
        """A thing noun phrase of topic ``t``."""
        rand, ch = self.rand, self.ch
        sg, pl = ch(t.things)
        if pl is None:
            plural = False
        elif plural is None:
            plural = rand() < 0.3
        adj = self.adj_for_thing(t) if rand() < 0.3 else None
        noun = (0, pl if plural else sg, t.name)
        first = adj[0] if adj else noun[1]
        toks: list[tuple]
        if poss and not indef and rand() < 0.06:
            if rand() < 0.5:
                toks = [(0, self.name(), _PERSON), (1, "'s", None)]
            else:
                toks = [(0, "the", None), (0, ch(t.agents)[0], t.name), (1, "'s", None)]
        elif pl is None:
            det = ch(("some", "")) if indef else ch(_MASS_DETS)
            toks = [(0, det, None)] if det else []
        elif plural:
            if rand() < 0.2:
                toks = [(0, self.num(), _NUM)]
            else:
                det = ch(_INDEF_PL) if indef else ch(_PL_DETS)
                toks = [(0, det, None)] if det else []
        else:
            det = "a" if indef else ch(_SG_DETS)
            toks = [(0, _a(first) if det == "a" else det, None)]
        if adj is not None:
            toks.append((0, adj[0], adj[1]))
        toks.append(noun)
        return toks, plural

    def cmp_words(self, pool: list) -> list[tuple]:
        w, c = self.ch(pool)
        return [(0, x, None) for x in c]

    def topic_cmp(self, t: _Topic) -> list[tuple]:
        """A comparative adjective: the topic's own when it has gradable ones, else a generic one."""
        if t.gradable and self.rand() < 0.6:
            w, c = self.ch(t.gradable)
            if len(c) == 1:
                return [(0, c[0], t.name)]
            return [(0, "more", None), (0, w, t.name)]
        return self.cmp_words(_THING_GRADABLE)

    # -- predicates ---------------------------------------------------------------------------------------

    def topic_or_generic_verb(self) -> tuple[tuple, str | None]:
        if self.rand() < 0.7:
            return self.ch(self.A.verbs), self.A.name
        return self.ch(_GENERIC_VERBS), None

    def rel_clause(self, tense: str | None) -> list[tuple]:
        """ "that the waiter prepared" (finite: past in past sentences, else present)."""
        subj, pl = self.agent_np(self.tp(), pronoun=self.rand() < 0.5)
        v, vtag = self.topic_or_generic_verb()
        toks = [(0, "that", None)]
        toks += [(2, "", _PLURAL), *subj, (3, "", _PLURAL)] if pl else subj
        if tense == "past":
            toks.append((0, v[_PASTF], _tags(vtag, _PAST)))
        else:
            toks.append((0, v[_BASE] if pl else v[_S3], vtag))
        return toks

    def pred(self, name: str, tense: str | None, subj_pl: bool) -> _Pred:
        rand, ch, A = self.rand, self.ch, self.A
        if name == "tv":
            rest: list[tuple] = []
            r = rand()
            if r < 0.12:
                rest = [(0, "with", None), *self.thing_np(self.tp(), poss=False)[0]]
            elif r < 0.22:
                rest = [(0, "for", None), *self.agent_np(self.tp(), subj=False)[0]]
            return _Pred("v", ch(A.verbs), A.name, obj=self.thing_np(self.tp())[0], rest=rest)
        if name == "gv":
            return _Pred("v", ch(_GENERIC_VERBS), None, obj=self.thing_np(self.tp())[0])
        if name == "iv":
            return _Pred("v", ch(_INTRANSITIVE_VERBS), None, rest=self.place_phrase(self.tp()), loc=True)
        if name == "ctrl":
            pre = [(0, "to", None), (0, ch(A.verbs)[_BASE], A.name)]
            return _Pred("v", ch(_CONTROL_VERBS), None, pre=pre, obj=self.thing_np(self.tp())[0])
        if name == "ger":
            pre = [(0, ch(A.verbs)[_ING], A.name)]
            return _Pred("v", ch(_GERUND_VERBS), None, pre=pre, obj=self.thing_np(self.tp())[0])
        if name == "tell":
            rest = [*self.agent_np(self.tp(), subj=False)[0], (0, "about", None), *self.thing_np(self.tp())[0]]
            return _Pred("v", _TELL, None, rest=rest)
        if name == "ditr":
            rest = [(0, "to", None), *self.agent_np(self.tp(), subj=False)[0]]
            return _Pred("v", ch(_DITRANSITIVE_VERBS), None, obj=self.thing_np(self.tp())[0], rest=rest)
        if name == "help":
            pre = [*self.agent_np(self.tp(), subj=False)[0], (0, ch(A.verbs)[_BASE], A.name)]
            return _Pred("v", _HELP, None, pre=pre, obj=self.thing_np(self.tp())[0])
        if name == "spend":
            if rand() < 0.6:
                pre = [(0, self.num(), _NUM), (0, ch(_v.DURATION_UNITS), None), (0, ch(A.verbs)[_ING], A.name)]
            else:
                pre = [(0, self.num(), _NUM), (0, ch(_v.MONEY_UNITS), None), (0, "on", None)]
            return _Pred("v", _SPEND, None, pre=pre, obj=self.thing_np(self.tp())[0])
        if name == "coord":
            v1, v2 = ch(A.verbs), ch(A.verbs)
            while v2 is v1:
                v2 = ch(A.verbs)
            rest = [(0, "and", None), (5, v2, A.name), *self.thing_np(self.tp())[0]]
            return _Pred("v", v1, A.name, obj=self.thing_np(self.tp())[0], rest=rest, coord=True)
        if name == "rel":
            v, vtag = self.topic_or_generic_verb()
            obj = self.thing_np(self.tp(), poss=False)[0]
            return _Pred("v", v, vtag, obj=obj, rest=self.rel_clause(tense))
        if name == "speech":
            rest = self.quote(self.tp())
            if rand() < 0.2:
                rest += [(0, "to", None), *self.agent_np(self.tp(), subj=False)[0]]
            return _Pred("v", ch(_SPEECH_VERBS), None, rest=rest)
        if name == "cmpAdv":
            v, vtag = self.topic_or_generic_verb()
            adv = ch(_ADVERBS)[1].split()
            rest = [(2, "", _CMP), *((0, w, None) for w in adv), (0, "than", None), (3, "", _CMP)]
            rest += self.agent_np(self.tp(), subj=False, pronoun=False)[0]
            return _Pred("v", v, vtag, obj=self.thing_np(self.tp())[0], rest=rest)
        if name == "cmpQty":
            v, vtag = self.topic_or_generic_verb()
            t = self.tp()
            sg, pl = ch(t.things)
            pre = [(2, "", _CMP), (0, "more", None)]
            rest = [(0, "than", None), (3, "", _CMP), *self.agent_np(self.tp(), subj=False, pronoun=False)[0]]
            return _Pred("v", v, vtag, pre=pre, obj=[(0, pl or sg, t.name)], rest=rest)
        if name == "copNP":
            adj = ch(_PERSON_ADJS)[0] if rand() < 0.5 else None
            sg, pl = ch(A.agents)
            rest = [] if subj_pl else [(0, _a(adj or sg), None)]
            if adj:
                rest.append((0, adj, None))
            rest.append((0, pl if subj_pl else sg, A.name))
            return _Pred("be", rest=rest)
        if name in ("copLoc", "thingLoc"):
            return _Pred("be", rest=self.place_phrase(self.tp()), loc=True)
        if name == "prog":
            v = ch(A.verbs)
            return _Pred("prog", v, A.name, pre=[(0, v[_ING], A.name)], obj=self.thing_np(self.tp())[0])
        if name == "copAdjA":
            return _Pred("be", rest=[(0, ch(_PERSON_ADJS)[0], None)])
        if name == "cmpAdjA":
            rest = [(2, "", _CMP), *self.cmp_words(_PERSON_GRADABLE), (0, "than", None), (3, "", _CMP)]
            rest += self.agent_np(self.tp(), subj=False, pronoun=False)[0]
            return _Pred("be", rest=rest)
        if name == "copAdj":
            a, tag = self.adj_for_thing(A)
            return _Pred("be", rest=[(0, a, tag)])
        if name == "cmpAdj":
            rest = [(2, "", _CMP), *self.topic_cmp(A), (0, "than", None), (3, "", _CMP)]
            rest += self.thing_np(self.tp())[0]
            return _Pred("be", rest=rest)
        if name == "pass":
            v = ch(A.verbs)
            rest = []
            if rand() < 0.6:
                rest = [(0, "by", None), *self.agent_np(self.tp(), subj=False, pronoun=False)[0]]
            return _Pred("pass", v, A.name, pre=[(0, v[_PP], A.name)], rest=rest)
        raise AssertionError(name)

    # -- clauses ------------------------------------------------------------------------------------------

    def realize(self, subj: list[tuple] | None, subj_pl: bool, p: _Pred, mood: str, tense: str | None,
                neg: str | None, wh: str | None = None, mark_plural: bool = True) -> list[tuple]:
        """Inflect and order one clause. mood: "decl", "q" (inverted, with optional wh-word), "imp"."""
        past = tense == "past"
        body = p.pre + (p.obj or []) + p.rest if wh != "what" else p.pre + p.rest
        out: list[tuple] = []
        if subj is not None and subj_pl and mark_plural:
            subj = [(2, "", _PLURAL), *subj, (3, "", _PLURAL)]
        form = _BASE  # form of a coordinated second verb
        if p.kind == "v":
            v, vtag = p.verb, p.vtag
            if mood == "imp":
                if neg == "never":
                    out.append((0, "never", _NEG))
                elif neg == "not":
                    out += [(0, "do", None), (0, "not", _NEG)]
                elif neg == "nt":
                    out.append((0, "don't", _NEG))
                elif self.rand() < 0.15:
                    out.append((0, "please", None))
                out.append((0, v[_BASE], _tags(vtag, _IMP)))
            elif mood == "decl":
                out += subj
                if tense == "fut":
                    if neg == "nt":
                        out.append((0, "won't", _NEG))
                    else:
                        out.append((0, "will", None))
                        if neg is not None:
                            out.append((0, neg, _NEG))
                    out.append((0, v[_BASE], vtag))
                elif neg is None or neg == "never":
                    if neg:
                        out.append((0, "never", _NEG))
                    if past:
                        form = _PASTF
                        out.append((0, v[_PASTF], _tags(vtag, _PAST)))
                    else:
                        form = _BASE if subj_pl else _S3
                        out.append((0, v[form], vtag))
                else:
                    aux = "did" if past else ("do" if subj_pl else "does")
                    if neg == "nt":
                        out.append((0, aux + "n't", (_PAST, _NEG) if past else _NEG))
                    else:
                        out += [(0, aux, _PAST if past else None), (0, "not", _NEG)]
                    out.append((0, v[_BASE], vtag))
            else:  # question: [wh] aux subj [never] verb
                if wh is not None:
                    out.append((0, wh, _Q))
                aux = "will" if tense == "fut" else "did" if past else ("do" if subj_pl else "does")
                if neg == "nt":
                    aux = "won't" if aux == "will" else aux + "n't"
                tags = [_PAST] if past else []
                if wh is None:
                    tags.append(_Q)
                if neg == "nt":
                    tags.append(_NEG)
                out.append((0, aux, tuple(tags) if len(tags) > 1 else (tags[0] if tags else None)))
                out += subj
                if neg == "never":
                    out.append((0, "never", _NEG))
                out.append((0, v[_BASE], vtag))
        else:  # be, prog, pass
            if tense == "fut":
                be = "be"
            elif past:
                be = "were" if subj_pl else "was"
            else:
                be = "are" if subj_pl else "is"
            ptag = _PAST if past else None
            if mood == "decl":
                out += subj
                if tense == "fut":
                    if neg == "nt":
                        out.append((0, "won't", _NEG))
                    else:
                        out.append((0, "will", None))
                        if neg is not None:
                            out.append((0, neg, _NEG))
                    out.append((0, "be", None))
                elif neg == "nt":
                    out.append((0, be + "n't", _tags(ptag, _NEG)))
                else:
                    out.append((0, be, ptag))
                    if neg is not None:
                        out.append((0, neg, _NEG))
            else:
                if wh is not None:
                    out.append((0, wh, _Q))
                aux = "will" if tense == "fut" else be
                if neg == "nt":
                    aux = "won't" if aux == "will" else aux + "n't"
                tags = [_PAST] if past else []
                if wh is None:
                    tags.append(_Q)
                if neg == "nt":
                    tags.append(_NEG)
                out.append((0, aux, tuple(tags) if len(tags) > 1 else (tags[0] if tags else None)))
                out += subj
                if neg == "never":
                    out.append((0, "never", _NEG))
                if tense == "fut":
                    out.append((0, "be", None))
        if p.coord:
            ptag = _PAST if form == _PASTF else None
            body = [(0, t[1][form], _tags(t[2], ptag)) if t[0] == 5 else t for t in body]
        out += body
        return out

    def simple_clause(self, tense: str) -> list[tuple]:
        """A short declarative clause (for subordinate, compound and if-clauses)."""
        rand = self.rand
        if rand() < 0.75:
            name = self.ch(_SIMPLE_AGENT_PREDS)
            subj, pl = self.agent_np(self.A)
        else:
            name = self.ch(_SIMPLE_THING_PREDS)
            subj, pl = self.thing_np(self.A)
        neg = self.ch(_NEG_DECL) if rand() < 0.12 else None
        return self.realize(subj, pl, self.pred(name, tense, pl), "decl", tense, neg)

    def adjuncts(self, tense: str | None, p: _Pred, wh: str | None) -> list[tuple[str, list[tuple]]]:
        """0-2 optional adjuncts as (kind, tokens); kinds "loc", "place", "date", "time" may be fronted."""
        rand = self.rand
        r = rand()
        n = 0 if r < 0.4 else (1 if r < 0.85 else 2)
        out: list[tuple[str, list[tuple]]] = []
        have_time = wh == "when"
        have_loc = p.loc or wh == "where"
        have_place = wh == "where"
        for _ in range(n):
            r = rand()
            if r < 0.22:
                if not have_loc:
                    have_loc = True
                    out.append(("loc", self.place_phrase(self.tp())))
            elif r < 0.36:
                if not have_place:
                    have_place = True
                    out.append(("place", self.place_name_phrase()))
            elif r < 0.52:
                if not have_time:
                    have_time = True
                    out.append(("date", self.date(tense)))
            elif r < 0.68:
                if not have_time:
                    have_time = True
                    out.append(("time", self.time(tense)))
            elif r < 0.78:
                if rand() < 0.7:
                    out.append(("num", [(0, "for", None), (0, self.num(), _NUM),
                                        (0, self.ch(_v.DURATION_UNITS), None)]))
                else:
                    out.append(("num", [(0, self.num(), _NUM), (0, "times", None)]))
            elif r < 0.86:
                out.append(("quote", [(0, self.ch(_QUOTE_INTROS), None), *self.quote(self.tp())]))
            elif p.kind == "v":
                out.append(("adv", [(0, self.ch(_ADVERBS)[0], None)]))
        return out

    def main_clause(self, mood: str, tense: str | None, qkind: str | None, frontable: bool) -> list[tuple]:
        rand, ch = self.rand, self.ch
        neg = None
        if rand() < 0.2:
            neg = ch(_NEG_Q if mood == "q" else _NEG_DECL)
        wh = None
        if mood == "q":
            if qkind is None:
                r = rand()
                qkind = "yn" if r < 0.45 else "wh" if r < 0.75 else "what" if r < 0.88 else "who"
            if qkind == "wh":
                wh = ch(_WH)
            elif qkind == "what":
                wh = "what"
        name = self.ch(_pred_table(mood, tense == "past", qkind, wh))
        mark_plural = True
        if mood == "imp":
            subj, pl = None, False
        elif qkind == "who":
            subj, pl = [(0, "who", _Q)], False
        elif name == "there":
            # the verb agrees with the noun phrase after it, which carries the plural span
            np, pl = self.thing_np(self.A, indef=True)
            if pl:
                np = [(2, "", _PLURAL), *np, (3, "", _PLURAL)]
            subj, mark_plural = [(0, "there", None)], False
        elif name in _AGENT_PREDS:
            subj, pl = self.agent_np(self.A)
        else:
            subj, pl = self.thing_np(self.A)
        if name == "there":
            p = _Pred("be", rest=[*np, *self.place_phrase(self.tp())], loc=True)
        else:
            p = self.pred(name, tense, pl)
        out = self.realize(subj, pl, p, "decl" if qkind == "who" else mood, tense, neg, wh, mark_plural)
        extra = self.adjuncts(tense, p, wh)
        front: list[tuple] = []
        if frontable and mood != "q" and extra and extra[0][0] in _FRONTABLE and rand() < 0.4:
            front = [*extra.pop(0)[1], (1, ",", None)]
        for _, e in extra:
            out += e
        if mood == "decl" and frontable:
            r = rand()
            if r < 0.1:
                out += [(0, ch(_SUB_CONJ), None), *self.simple_clause("pres" if tense == "fut" else tense)]
            elif r < 0.17:
                out += [(1, ",", None), (0, ch(("and", "but", "so")), None), *self.simple_clause(tense)]
        return front + out

    def sentence(self, A: _Topic, B: _Topic | None = None, mood: str | None = None) -> list[tuple]:
        """Tokens of one sentence about topic A (and B)."""
        rand = self.rand
        self.A, self.B = A, B
        if mood is None:
            r = rand()
            mood = "q" if r < 0.18 else ("imp" if r < 0.27 else "decl")
        cond = rand() < 0.1
        if mood == "imp":
            tense = None
        else:
            r = rand()
            tense = "past" if r < 0.45 else ("pres" if r < 0.82 else "fut")
        if cond:
            if mood == "q" or (tense == "past" and rand() < 0.6):
                tense = "fut"
            elif tense == "past":
                tense = "pres"
            if_clause = [(0, "if", _COND), *self.simple_clause("pres")]
            main = self.main_clause(mood, tense, "yn" if mood == "q" else None, False)
            if mood == "decl" and tense == "fut" and rand() < 0.35:
                toks = main + if_clause
            else:
                toks = if_clause + [(1, ",", None)] + main
        else:
            toks = self.main_clause(mood, tense, None, True)
        toks.append((1, "?", _Q) if mood == "q" else (1, ".", None))
        return toks

    def force_topics(self, toks: list[tuple], missing: list[_Topic]) -> list[tuple]:
        """Insert "near <thing>" before the final punctuation for each topic that got no word."""
        end = toks[-1]
        toks = toks[:-1]
        for t in missing:
            toks += [(0, "beside" if self.rand() < 0.3 else "near", None), *self.thing_np(t, poss=False)[0]]
        toks.append(end)
        return toks


# ---------------------------------------------------------------------------------------------------------
# Public API

HELDOUT_MODULUS = 10


def is_heldout(text: str) -> bool:
    """Whether a sentence belongs to the heldout split (crc32 of its UTF-8 text divisible by 10)."""
    return zlib.crc32(text.encode("utf-8")) % HELDOUT_MODULUS == 0


def _check_split(split: str) -> bool:
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    return split == "heldout"


def concepts() -> list[Concept]:
    """All planted concepts: the topics first, then the forms."""
    out = [Concept(t.name, "topic", t.description) for t in _TOPICS]
    out += [Concept(f, "form", _FORM_DESCRIPTIONS[f]) for f in FORMS]
    return out


class _Stream:
    """Sentences of one split, with topic control, for sentences/documents/dialogues."""

    def __init__(self, seed: int, split: str, purpose: str):
        self.heldout = _check_split(split)
        self.gen = _Gen(random.Random(f"tinyworld:{purpose}:{seed}:{split}"))

    def one(self, A: _Topic | None = None, two_p: float = 0.1, mood: str | None = None,
            ) -> tuple[str, dict[str, list[tuple[int, int]]]]:
        """Text and spans of the next sentence of this split."""
        g = self.gen
        rand = g.rand
        heldout = self.heldout
        while True:
            a = A if A is not None else g.ch(_TOPICS)
            b = None
            if rand() < two_p:
                b = g.ch(_TOPICS)
                while b is a:
                    b = g.ch(_TOPICS)
            toks = g.sentence(a, b, mood)
            text, spans = _emit(toks)
            if a.name not in spans or (b is not None and b.name not in spans):
                missing = [t for t in (a, b) if t is not None and t.name not in spans]
                text, spans = _emit(g.force_topics(toks, missing))
            if (zlib.crc32(text.encode("utf-8")) % HELDOUT_MODULUS == 0) == heldout:
                return text, spans


def iter_sentences(*, seed: int = 0, split: str = "train") -> Iterator[Record]:
    """Yield labelled sentences of ``split`` forever, deterministically from ``(seed, split)``."""
    stream = _Stream(seed, split, "sentences")
    i = 0
    while True:
        text, spans = stream.one()
        yield Record(i, text, tuple(sorted(spans)), spans)
        i += 1


@contextmanager
def _no_gc() -> Iterator[None]:
    """Pause the cyclic garbage collector while building big lists of acyclic records (much faster)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def sentences(n: int, *, seed: int = 0, split: str = "train") -> list[Record]:
    """The first ``n`` sentences of ``iter_sentences(seed=seed, split=split)``."""
    it = iter_sentences(seed=seed, split=split)
    with _no_gc():
        return [next(it) for _ in range(n)]


def _join(parts: list[tuple[str, dict[str, list[tuple[int, int]]]]], sep: str = " "):
    text_parts: list[str] = []
    spans: dict[str, list[tuple[int, int]]] = {}
    pos = 0
    for i, (t, sp) in enumerate(parts):
        if i:
            text_parts.append(sep)
            pos += len(sep)
        for k, v in sp.items():
            spans.setdefault(k, []).extend((s + pos, e + pos) for s, e in v)
        text_parts.append(t)
        pos += len(t)
    return "".join(text_parts), spans


def _document(stream: _Stream, i: int) -> DocRecord:
    g = stream.gen
    A = g.ch(_TOPICS)
    k = 2 + int(g.rand() * 4)
    switch_at = 1 + int(g.rand() * (k - 1)) if g.rand() < 0.15 else k
    B = g.ch([t for t in _TOPICS if t is not A])
    g.hero = g.ch(_FULL_NAMES) if g.rand() < 0.5 else None
    try:
        parts = [stream.one(A if j < switch_at else B, two_p=0.05) for j in range(k)]
    finally:
        g.hero = None
    text, spans = _join(parts)
    return DocRecord(i, text, A.name, tuple(sorted(spans)), spans)


def documents(n: int, *, seed: int = 0, split: str = "train") -> list[DocRecord]:
    """Short documents of 2-5 sentences, mostly about one topic (about 15% drift to a second topic).

    A document often follows one protagonist (a person name reused across its sentences). Every
    sentence belongs to ``split``.
    """
    stream = _Stream(seed, split, "documents")
    with _no_gc():
        return [_document(stream, i) for i in range(n)]


def _dialogue(stream: _Stream, i: int) -> DialogueRecord:
    g = stream.gen
    A = g.ch(_TOPICS)
    messages: list[dict[str, str]] = []
    for _turn in range(2 if g.rand() < 0.2 else 1):
        question = stream.one(A, two_p=0.0, mood="q")[0]
        answer = " ".join(stream.one(A, two_p=0.0, mood="decl")[0] for _ in range(1 + int(g.rand() * 3)))
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return DialogueRecord(i, A.name, messages)


def dialogues(n: int, *, seed: int = 0, split: str = "train") -> list[DialogueRecord]:
    """Chats for Llama 3 chat-format training: a user question about a topic, 1-3 on-topic answer sentences.

    About 20% of dialogues have a second user question and answer on the same topic. Every sentence
    belongs to ``split``.
    """
    stream = _Stream(seed, split, "dialogues")
    with _no_gc():
        return [_dialogue(stream, i) for i in range(n)]


def topic_prompts(*, seed: int = 0) -> list[tuple[str, str]]:
    """For each topic, four sentence openings on that topic, as ``(prompt, topic)`` pairs.

    The openings are an agent ("The chef"), a bare plural agent ("Chefs"), a thing with a topic adjective
    ("The spicy sauce") and a fronted place ("In the kitchen,").
    """
    rng = random.Random(f"tinyworld:prompts:{seed}")
    out = []
    for t in _TOPICS:
        agent_sg, agent_pl = rng.choice(t.agents)
        thing = rng.choice(t.things)[0]
        adj = rng.choice(t.adjs)[0]
        prep, place = rng.choice(t.places)
        out += [
            (f"The {agent_sg}", t.name),
            (agent_pl[0].upper() + agent_pl[1:], t.name),
            (f"The {adj} {thing}", t.name),
            (f"{prep.capitalize()} the {place},", t.name),
        ]
    return out


def neutral_prompts() -> list[str]:
    """Sentence openings that name no topic (for steering experiments)."""
    return list(_v.NEUTRAL_PROMPTS)


_WORD_RE = re.compile(r"[a-z]+")


def label_text(text: str) -> set[str]:
    """Topic concepts present in arbitrary text: those with at least one vocabulary word in it.

    Matching is on whole words, case-insensitive, over every surface form tinyworld generates (plurals,
    verb inflections, comparatives).
    """
    get = WORD_TO_TOPIC.get
    found = set()
    for w in _WORD_RE.findall(text.lower()):
        t = get(w)
        if t is not None:
            found.add(t)
    return found
