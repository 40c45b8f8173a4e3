"""A corpus of real text that crucible did not generate, built offline from this machine's files.

Sources, each document written by people for people:

- ``changelog``: Debian package changelogs (``/usr/share/doc/*/changelog*.gz``), one document
  per run of entries of at least 2,000 characters; "No-change rebuild" and "Non-maintainer
  upload" entries repeat across packages, so there are real near-duplicates;
- ``copyright``: Debian copyright files (``/usr/share/doc/*/copyright``), one per package;
  the GPL, Apache and BSD texts recur in many of them;
- ``python``: the descriptions (README) and licence files of the Python distributions
  installed beside this interpreter, one per file.

Documents of all sources are interleaved in a seeded order and taken until the size asked for,
so any size holds the same mix.
"""

from __future__ import annotations

import gzip
import json
import random
import site
from collections.abc import Iterator
from pathlib import Path

ENTRY_CHARS = 2000  # changelog entries are joined until a document reaches this size


def changelog_docs(doc_dir: Path) -> Iterator[str]:
    """Runs of Debian changelog entries (an entry starts at an unindented line)."""
    for f in sorted(doc_dir.glob("*/changelog*.gz")):
        try:
            text = gzip.decompress(f.read_bytes()).decode("utf-8", "replace")
        except (OSError, EOFError):
            continue
        cur: list[str] = []
        size = 0
        for line in text.splitlines():
            if line and not line[0].isspace() and size >= ENTRY_CHARS:
                yield "\n".join(cur)
                cur, size = [], 0
            cur.append(line)
            size += len(line) + 1
        if size > 200:
            yield "\n".join(cur)


def copyright_docs(doc_dir: Path) -> Iterator[str]:
    """Debian copyright files."""
    for f in sorted(doc_dir.glob("*/copyright")):
        yield f.read_text("utf-8", "replace")


def python_docs() -> Iterator[str]:
    """Descriptions (the METADATA body) and licence files of installed Python distributions."""
    for sp in sorted({Path(p) for p in site.getsitepackages()}):
        for info in sorted(sp.glob("*.dist-info")):
            meta = info / "METADATA"
            if meta.is_file():
                body = meta.read_text("utf-8", "replace").partition("\n\n")[2]
                if body.strip():
                    yield body
            for lic in sorted(info.rglob("*")):
                if lic.is_file() and lic.name.upper().startswith(("LICEN", "COPYING", "NOTICE")):
                    yield lic.read_text("utf-8", "replace")


def write_real_corpus(
    folder: Path, mb: float, seed: int = 0, file_mb: float = 12.5, doc_dir: str = "/usr/share/doc"
) -> dict:
    """Write up to ``mb`` MB of real text as JSONL files under ``folder``.

    Args:
        folder: the output folder (created).
        mb: MB of UTF-8 text to take (less when the sources hold less).
        seed: the order in which documents of all sources are taken.
        file_mb: MB of text per JSONL file.
        doc_dir: Debian's package documentation folder.

    Returns:
        ``{"texts": {id: text}, "files": [paths], "sources": {source: (docs, bytes)}}``.
    """
    found = {
        "changelog": list(changelog_docs(Path(doc_dir))),
        "copyright": list(copyright_docs(Path(doc_dir))),
        "python": list(python_docs()),
    }
    order = [(src, k) for src, docs in found.items() for k in range(len(docs))]
    random.Random(seed).shuffle(order)
    folder.mkdir(parents=True, exist_ok=True)
    texts: dict[str, str] = {}
    sources: dict[str, tuple[int, int]] = {}
    files: list[str] = []
    lines: list[str] = []
    total = chunk = 0

    def flush() -> None:
        path = folder / f"real-{len(files):03d}.jsonl"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        files.append(str(path))
        lines.clear()

    for src, k in order:
        if total >= mb * 1e6:
            break
        text = found[src][k]
        nbytes = len(text.encode("utf-8"))
        did = f"{src}-{k:06d}"
        texts[did] = text
        docs, size = sources.get(src, (0, 0))
        sources[src] = (docs + 1, size + nbytes)
        lines.append(json.dumps({"id": did, "text": text}))
        total, chunk = total + nbytes, chunk + nbytes
        if chunk >= file_mb * 1e6:
            flush()
            chunk = 0
    if lines:
        flush()
    return {"texts": texts, "files": files, "sources": sources}
