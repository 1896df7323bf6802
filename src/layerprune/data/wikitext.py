"""Turning MediaWiki markup into the plain prose a language model is evaluated on.

The gensim wheel ships a slice of an English Wikipedia dump; WikiText was built from the same kind
of source by keeping article prose and dropping templates, tables, references and file links.
This is our offline stand-in: the same idea, done with a small brace-aware scanner rather than
regexes alone, because templates nest.
"""

from __future__ import annotations

import html
import re
import xml.etree.ElementTree as ElementTree
from collections.abc import Iterator
from typing import IO

_DROPPED_LINK_PREFIXES = ("file:", "image:", "category:", "media:")
_REF = re.compile(r"<ref[^>/]*/>|<ref[^>]*>.*?</ref>", re.DOTALL | re.IGNORECASE)
_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
_BLOCK_TAGS = re.compile(r"<(gallery|math|timeline|score|syntaxhighlight|source|imagemap)[^>]*>.*?</\1>",
                         re.DOTALL | re.IGNORECASE)
_TAG = re.compile(r"</?[a-zA-Z][^>]*>")
_EXTERNAL_LINK = re.compile(r"\[(?:https?|ftp)://[^\s\]]+(?:\s+([^\]]*))?\]")
_BOLD_ITALIC = re.compile(r"'{2,5}")
_HEADING = re.compile(r"^(=+)\s*(.*?)\s*\1\s*$", re.MULTILINE)
_LIST_MARKER = re.compile(r"^[*#:;]+\s*", re.MULTILINE)
_BLANK_RUNS = re.compile(r"\n{3,}")
_SPACES = re.compile(r"[ \t]{2,}")
_MAGIC_WORD = re.compile(r"__[A-Z]+__")  # __TOC__, __NOTOC__: layout switches, not prose
_NOISE_HEADINGS = {"references", "external links", "see also", "further reading", "notes", "bibliography",
                   "sources", "footnotes", "citations"}


_NESTED_SPANS = {"{{": "}}", "{|": "|}"}  # templates and tables, which nest inside each other


def _remove_nested(text: str) -> str:
    """Remove every template ``{{...}}`` and table ``{|...|}``, however they nest.

    One scanner with a stack of expected closers, because an infobox may hold a table and then
    ``|}}}`` must close the table first and the template second.
    """
    out: list[str] = []
    closers: list[str] = []
    i = 0
    while i < len(text):
        opener = next((o for o in _NESTED_SPANS if text.startswith(o, i)), None)
        if opener:
            closers.append(_NESTED_SPANS[opener])
            i += len(opener)
        elif closers and text.startswith(closers[-1], i):
            i += len(closers.pop())
        else:
            if not closers:
                out.append(text[i])
            i += 1
    return "".join(out)


def _replace_links(text: str) -> str:
    """``[[target|label]]`` -> label, ``[[target]]`` -> target; file/category links are dropped."""
    out: list[str] = []
    i = 0
    while True:
        start = text.find("[[", i)
        if start < 0:
            out.append(text[i:])
            return "".join(out)
        out.append(text[i:start])
        depth, j = 0, start
        while j < len(text):
            if text.startswith("[[", j):
                depth += 1
                j += 2
            elif text.startswith("]]", j):
                depth -= 1
                j += 2
                if depth == 0:
                    break
            else:
                j += 1
        inner = text[start + 2:j - 2]
        if not inner.lower().lstrip(":").startswith(_DROPPED_LINK_PREFIXES):
            out.append(_replace_links(inner.rsplit("|", 1)[-1]))
        i = j


def _drop_trailing_sections(text: str) -> str:
    """Cut the article at the first References / External links / See also heading."""
    for match in _HEADING.finditer(text):
        if match.group(2).strip().lower() in _NOISE_HEADINGS:
            return text[:match.start()]
    return text


def strip_markup(wiki: str) -> str:
    """Plain text of one article's wiki markup: prose and headings, no templates, tables or refs."""
    text = html.unescape(wiki)
    text = _COMMENT.sub("", text)
    text = _REF.sub("", text)
    text = _BLOCK_TAGS.sub("", text)
    text = _remove_nested(text)
    text = _drop_trailing_sections(text)
    text = _replace_links(text)
    text = _EXTERNAL_LINK.sub(lambda m: m.group(1) or "", text)
    text = _TAG.sub("", text)
    text = _MAGIC_WORD.sub("", text)
    text = _BOLD_ITALIC.sub("", text)
    text = _HEADING.sub(lambda m: m.group(2), text)
    text = _LIST_MARKER.sub("", text)
    lines = [_SPACES.sub(" ", line).strip() for line in text.splitlines()]
    text = "\n".join(line for line in lines if not line.startswith(("|", "!")))
    return _BLANK_RUNS.sub("\n\n", text).strip()


def iter_articles(stream: IO[bytes]) -> Iterator[tuple[str, str]]:
    """(title, plain text) of every main-namespace, non-redirect article of a MediaWiki XML dump."""
    title, namespace, body = "", "", ""
    for _, element in ElementTree.iterparse(stream, events=("end",)):
        tag = element.tag.rsplit("}", 1)[-1]
        if tag == "title":
            title = element.text or ""
        elif tag == "ns":
            namespace = element.text or ""
        elif tag == "text":
            body = element.text or ""
        elif tag == "page":
            if namespace == "0" and not body.lstrip().upper().startswith("#REDIRECT"):
                plain = strip_markup(body)
                if plain:
                    yield title, plain
            element.clear()
