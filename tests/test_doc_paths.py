"""Every repository path the hand-written docs name exists.

Checked documents: README.md, docs/*.md (except the generated results reports) and
kernels/README.md. A path is

* a markdown link target (``[text](target)``), resolved against the document's folder, or
* a token inside inline backticks that looks like a repository path: it contains a ``/`` or
  ends in a known extension, and its first component is a top-level entry of the repository;
* in a README inside a code folder (``kernels/README.md``), also a bare file name with a known
  extension (``rows.py``), resolved against that folder.

URLs, ``#anchors``, globs and placeholders (``*``, ``<op>``, ``{a,b}``, ``...``) and outputs
(``out/``, ``runs/``, ``data/``, ``.venv/``) are ignored. Fenced code blocks are skipped.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

EXTENSIONS = (".py", ".cpp", ".h", ".md", ".json", ".png", ".toml", ".txt", ".cfg", ".yaml", ".yml", ".sh")
OUTPUT_DIRS = ("out", "runs", "data", ".venv")
# Top-level entries a doc may name, whether or not they exist yet (a missing one must fail, not be skipped).
TOP_LEVEL = {"dynenc", "kernels", "csrc", "bench", "tests", "docs", "recipes", ".ci",
             "setup.py", "pyproject.toml", "Makefile", "README.md"}
TOP_LEVEL |= {p.name for p in ROOT.iterdir() if p.name != ".git"}

FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
PLACEHOLDER = re.compile(r"[*<>{}]|\.\.\.")


def documents() -> list[Path]:
    docs = [ROOT / "README.md", ROOT / "kernels" / "README.md"]
    docs += [p for p in sorted((ROOT / "docs").glob("*.md")) if not p.name.startswith("results")]
    return [p for p in docs if p.is_file()]


def _is_output(rel: str) -> bool:
    return rel.split("/", 1)[0] in OUTPUT_DIRS


def link_paths(doc: Path, text: str) -> set[str]:
    """Markdown link targets as repository-relative paths."""
    found = set()
    for target in LINK.findall(text):
        target = target.split("#", 1)[0]
        if not target or "://" in target or target.startswith("mailto:") or PLACEHOLDER.search(target):
            continue
        resolved = (doc.parent / target).resolve()
        try:
            rel = resolved.relative_to(ROOT).as_posix()
        except ValueError:  # points outside the repository
            rel = target
        if not _is_output(rel):
            found.add(rel)
    return found


def code_paths(text: str, local_dir: str = "") -> set[str]:
    """Tokens in inline code that look like repository paths (relative to the repository root).

    With ``local_dir`` (a folder relative to the root), bare file names are taken as files
    of that folder."""
    found = set()
    for span in INLINE_CODE.findall(text):
        for token in span.split():
            token = token.strip("'\",;:()[]").split("#", 1)[0]
            if token.startswith("./"):
                token = token[2:]
            if not token or "://" in token or PLACEHOLDER.search(token):
                continue
            if "/" not in token and not token.endswith(EXTENSIONS):
                continue
            if token.split("/", 1)[0] not in TOP_LEVEL:
                if local_dir and "/" not in token:
                    found.add(f"{local_dir}/{token}")
                continue
            if not _is_output(token):
                found.add(token.rstrip("/"))
    return found


def named_paths(doc: Path) -> set[str]:
    text = FENCE.sub("", doc.read_text(encoding="utf-8"))
    folder = doc.parent.relative_to(ROOT).as_posix()
    local_dir = "" if folder in (".", "docs") else folder
    return link_paths(doc, text) | code_paths(text, local_dir)


@pytest.mark.parametrize("doc", documents(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_named_paths_exist(doc: Path) -> None:
    missing = sorted(path for path in named_paths(doc) if not (ROOT / path).exists())
    assert not missing, f"{doc.relative_to(ROOT)} names paths that do not exist:\n  " + "\n  ".join(missing)


def test_extraction() -> None:
    """The extractor finds what it should and ignores the rest."""
    text = ("see `dynenc/ops/registry.py`, `csrc/` and [kernels](../kernels/README.md#traffic-model); "
            "not `out/bench/bench.json`, `dynenc/ops/<op>.py`, `dynenc.kernels`, `x[idx]`, "
            "`model.pt`, [web](https://example.com/a.md)\n```\n`tests/in_a_fence.py`\n```\n")
    doc = ROOT / "docs" / "example.md"
    stripped = FENCE.sub("", text)
    assert code_paths(stripped) == {"dynenc/ops/registry.py", "csrc"}
    assert link_paths(doc, stripped) == {"kernels/README.md"}
    assert code_paths("`rows.py` and `dynenc/ops/rows.py`", local_dir="kernels") == {
        "kernels/rows.py", "dynenc/ops/rows.py"}
