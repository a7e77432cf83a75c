"""Untrusted text for the terminal: corpus sentences, explanations, prompts and completions shown as written.

rich interprets ``[bold]``-style markup in plain strings and passes escape sequences through, so a corpus line or
an LLM's explanation could recolour, clear or hyperlink the terminal (or crash a table on a stray ``[/]``). Print
such text through :func:`literal` (a rich ``Text``: no markup, no emoji codes) or :func:`printable` (a str, for
``console.print(..., markup=False)``).
"""

from __future__ import annotations

import itertools
import re

from rich.text import Text

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # C0 and C1 controls but newline and tab


def printable(text: str) -> str:
    """``text`` with control characters (ESC, BEL, CR, ...; not newline or tab) written as ``\\xNN``: sent to a
    terminal they would move the cursor, recolour, hide text or open hyperlinks."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m[0]):02x}", text)


def literal(text: str, style: str = "") -> Text:
    """A rich Text of untrusted ``text``: shown as written (markup and emoji codes not interpreted, control
    characters visible, see :func:`printable`)."""
    return Text(printable(text), style=style)


def print_stream(console, prompt: str, chunks) -> str:
    """Print ``prompt`` (bold), then each chunk's text as it comes, then a newline; returns the text generated.

    The prompt waits for the first chunk, so an error before it (a prompt past the model's context) is not
    preceded by the whole prompt."""
    chunks = iter(chunks)
    first = next(chunks, None)  # starts the generation: an error in it comes before anything is printed
    console.print(printable(prompt), end="", style="bold", markup=False, highlight=False)
    text = ""
    try:
        for chunk in itertools.chain([] if first is None else [first], chunks):
            text += chunk.text
            console.print(printable(chunk.text), end="", markup=False, highlight=False)
    finally:  # an error midway leaves the line ended, for the error line after it
        console.print()
    return text
