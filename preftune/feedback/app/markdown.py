"""Markdown of prompts, responses and guidelines as HTML that is safe to show.

Safe by construction rather than by cleaning afterwards: the parser never passes raw HTML through
(``html=False`` writes ``<script>`` as text), refuses ``javascript:``, ``vbscript:``, ``file:`` and
``data:`` links, and has no image rule (a remote image would call out from the annotator's browser;
the page's Content-Security-Policy blocks them too). Links open with ``rel=noopener noreferrer``.
"""

from __future__ import annotations

from functools import lru_cache

from markdown_it import MarkdownIt
from markupsafe import Markup


@lru_cache(maxsize=1)
def _parser() -> MarkdownIt:
    # breaks: a single newline in model output is a line break, as in chat interfaces
    md = MarkdownIt("commonmark", {"html": False, "breaks": True}).enable(["table", "strikethrough"])
    md.disable("image")

    def link_open(renderer, tokens, idx, options, env):
        tokens[idx].attrSet("rel", "nofollow noopener noreferrer")
        return renderer.renderToken(tokens, idx, options, env)

    md.add_render_rule("link_open", link_open)
    return md


def render_markdown(text: str) -> Markup:
    """``text`` (markdown) as HTML; everything the text says that is not markdown stays text."""
    return Markup(_parser().render(text or ""))
