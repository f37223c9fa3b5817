"""The user's documents hold together: every relative link of the README, docs/ and the benchmarks'
README names a file that exists and, with an anchor, a heading in it; the README stays short."""

import glob
import os
import re

from tests.conftest import REPO_ROOT

DOCUMENTS = ["README.md", "benchmarks/README.md"] + sorted(
    os.path.relpath(p, REPO_ROOT) for p in glob.glob(os.path.join(REPO_ROOT, "docs", "*.md")))
LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchors(path: str) -> set[str]:
    """GitHub's anchors of a Markdown file's headings (lower case, punctuation dropped, spaces to -)."""
    out, fenced = set(), False
    for line in open(path, encoding="utf-8"):
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            out.add(re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", title)))
    return out


def test_every_relative_link_leads_to_a_file_and_heading():
    broken = []
    for document in DOCUMENTS:
        folder = os.path.dirname(os.path.join(REPO_ROOT, document))
        for target in LINK.findall(open(os.path.join(REPO_ROOT, document), encoding="utf-8").read()):
            if re.match(r"[a-z]+:", target):
                continue  # a URL
            path, _, anchor = target.partition("#")
            full = os.path.normpath(os.path.join(folder, path)) if path else os.path.join(REPO_ROOT, document)
            if not os.path.exists(full):
                broken.append(f"{document}: {target} (no such file)")
            elif anchor and full.endswith(".md") and anchor not in anchors(full):
                broken.append(f"{document}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_the_readme_is_a_short_users_document():
    text = open(os.path.join(REPO_ROOT, "README.md"), encoding="utf-8").read()
    assert len(text.splitlines()) <= 200
    assert not re.search(r"\bissues?\b", text, re.IGNORECASE)
