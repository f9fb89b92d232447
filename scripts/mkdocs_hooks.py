"""MkDocs hooks of the documentation site (``hooks:`` in mkdocs.yml).

idempo's docstrings name other objects with Sphinx roles (:class:`~idempo.Store`), which mkdocstrings renders as
text: ``:class:<code>~idempo.Store</code>``. This turns each into a cross-reference that mkdocs-autorefs resolves
(a link to the object's entry in the API reference), or into plain code where the object has no entry (a private
module): ``~`` shows the last part of the name only, as in Sphinx.
"""

from __future__ import annotations

import re
from typing import Any

_ROLE = re.compile(r":(?:class|func|meth|mod|data|attr|exc|obj):<code>(?P<tilde>~?)(?P<target>[\w.]+)</code>")


def _reference(match: re.Match[str]) -> str:
    target = match["target"]
    title = target.rsplit(".", 1)[-1] if match["tilde"] else target
    return f'<autoref identifier="{target}" optional><code>{title}</code></autoref>'


def on_page_content(html: str, **kwargs: Any) -> str:
    return _ROLE.sub(_reference, html)
