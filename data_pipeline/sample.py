"""A generated sample corpus: mixed JSONL (plain, .gz, .zst) and WARC input with planted exact
duplicates, near-duplicates at measured Jaccard similarity, junk, bad lines and several
languages. Text comes from word lists shipped with the package (``sample_words/``); nothing is
downloaded.
"""

from __future__ import annotations

import gzip
import io
import json
import random
import uuid
from importlib import resources
from pathlib import Path
from typing import Any

import zstandard
from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

from crucible.data_pipeline.dedup.verify import exact_jaccard


def _load_words(lang: str) -> list[str]:
    """The word list of ``lang`` (package data, one word a line, most frequent first)."""
    text = resources.files("crucible.data_pipeline").joinpath(f"sample_words/{lang}.txt")
    return text.read_text(encoding="utf-8").splitlines()


WORDS = {lang: _load_words(lang) for lang in ("en", "fr", "de", "es")}


def make_text(rng: random.Random, lang: str = "en", n_words: int = 200) -> str:
    """Paragraphs of sentences (8-20 words, capitalised, full stop) from ``lang``'s word list."""
    words = WORDS[lang]
    stop = words[:10]  # each list starts with its most frequent function words
    paras, sents, count = [], [], 0
    while count < n_words:
        k = rng.randint(8, 20)
        s = [rng.choice(stop if rng.random() < 0.3 else words) for _ in range(k)]
        sents.append(" ".join(s).capitalize() + ".")
        count += k
        if len(sents) >= rng.randint(3, 6):
            paras.append(" ".join(sents))
            sents = []
    if sents:
        paras.append(" ".join(sents))
    return "\n".join(paras)


def near_duplicate(rng: random.Random, text: str, target: float, lang: str = "en") -> str:
    """``text`` with scattered words replaced so that 5-gram Jaccard is near ``target``."""
    lines = [line.split(" ") for line in text.split("\n")]
    flat = [(i, j) for i, line in enumerate(lines) for j in range(len(line))]
    m = max(len(flat) - 4, 1)
    k = max(1, round(m * (1 - target) / (5 * (1 + target))))
    for i, j in rng.sample(flat, min(k, len(flat))):
        lines[i][j] = rng.choice(WORDS[lang])
    return "\n".join(" ".join(line) for line in lines)


JUNK = [
    "Click here. Buy now. Login.",
    "lorem ipsum dolor sit amet. " * 30,
    "# # # # ### ## # tag #tag #news #hot " * 20,
    "- item one\n- item two\n- item three\n" * 30,
    "function f() { return 1; } var x = {a: 1};\n" * 20,
    "The same line again and again.\n" * 40,
]


def generate_corpus(
    local_dir: str | Path,
    n_docs: int = 300,
    seed: int = 0,
    near_dup_frac: float = 0.2,
    exact_dup_frac: float = 0.05,
    junk_frac: float = 0.08,
    other_lang_frac: float = 0.1,
    files: int = 3,
    warc: bool = True,
) -> dict[str, Any]:
    """Write a sample corpus under local directory ``local_dir``; return its ground truth.

    Args:
        local_dir: the directory (created).
        n_docs: number of documents (before planted bad lines).
        seed: random seed (same seed, same bytes).
        near_dup_frac: fraction of documents that are near-duplicates of an earlier one.
        exact_dup_frac: fraction that are exact copies of an earlier one.
        junk_frac: fraction of junk pages the quality filters should drop.
        other_lang_frac: fraction in French, German or Spanish.
        files: number of JSONL files (plain, .gz, .zst in turn).
        warc: also write a WARC file of HTML pages (and one non-HTML record).

    Returns:
        ``{"texts": {id: text}, "near_dups": [(id, of_id, jaccard)], "exact_dups": [(id, of)],
        "junk": [ids], "other_lang": [ids], "files": [paths]}``.
    """
    rng = random.Random(seed)
    out = Path(local_dir)
    out.mkdir(parents=True, exist_ok=True)
    texts: dict[str, str] = {}
    originals: list[str] = []
    truth: dict[str, Any] = {"near_dups": [], "exact_dups": [], "junk": [], "other_lang": []}
    for i in range(n_docs):
        did = f"doc-{i:06d}"
        r = rng.random()
        if originals and r < near_dup_frac:
            src = rng.choice(originals)
            target = rng.uniform(0.55, 0.98)
            texts[did] = near_duplicate(rng, texts[src], target)
            truth["near_dups"].append((did, src, exact_jaccard(texts[did], texts[src], 5)))
        elif originals and r < near_dup_frac + exact_dup_frac:
            src = rng.choice(originals)
            texts[did] = texts[src]
            truth["exact_dups"].append((did, src))
        elif r < near_dup_frac + exact_dup_frac + junk_frac:
            texts[did] = rng.choice(JUNK)
            truth["junk"].append(did)
        elif r < near_dup_frac + exact_dup_frac + junk_frac + other_lang_frac:
            texts[did] = make_text(rng, rng.choice(["fr", "de", "es"]), rng.randint(80, 300))
            truth["other_lang"].append(did)
        else:
            texts[did] = make_text(rng, "en", rng.randint(80, 400))
            originals.append(did)
    ids = list(texts)
    n_files = files + (1 if warc else 0)
    chunks = [ids[k::n_files] for k in range(n_files)]
    paths = []
    for k in range(files):
        lines = [
            json.dumps({"id": d, "text": texts[d], "url": f"https://example.com/{d}"})
            for d in chunks[k]
        ]
        # planted bad input: a malformed line and a line without text
        lines.insert(len(lines) // 2, '{"id": "broken", "text": "unterminated')
        lines.insert(len(lines) // 3, json.dumps({"id": f"notext-{k}", "body": "x"}))
        blob = ("\n".join(lines) + "\n").encode()
        suffix = (".jsonl", ".jsonl.gz", ".jsonl.zst")[k % 3]
        path = out / f"part-{k}{suffix}"
        if suffix.endswith(".gz"):
            blob = gzip.compress(blob, mtime=0)
        elif suffix.endswith(".zst"):
            blob = zstandard.ZstdCompressor().compress(blob)
        path.write_bytes(blob)
        paths.append(str(path))
    if warc:
        path = out / "web-0.warc.gz"
        write_warc(path, [(d, texts[d]) for d in chunks[-1]], rng)
        paths.append(str(path))
    truth.update(texts=texts, files=paths)
    return truth


def html_page(text: str) -> str:
    """A simple HTML page whose article holds ``text``'s paragraphs."""
    paras = "".join(f"<p>{p}</p>" for p in text.split("\n"))
    return (
        "<!doctype html><html><head><title>Sample</title></head><body>"
        "<nav><a href='/'>Home</a></nav><article>" + paras + "</article></body></html>"
    )


def write_warc(path: Path, docs: list[tuple[str, str]], rng: random.Random) -> None:
    """A gzipped WARC of HTML responses for ``docs`` (plus one image record to skip)."""
    buf = io.BytesIO()
    writer = WARCWriter(buf, gzip=True)

    def record(uri: str, body: bytes, ctype: str, rid: str) -> None:
        http = StatusAndHeaders("200 OK", [("Content-Type", ctype)], protocol="HTTP/1.1")
        rec = writer.create_warc_record(
            uri,
            "response",
            payload=io.BytesIO(body),
            http_headers=http,
            warc_headers_dict={
                "WARC-Record-ID": rid,
                "WARC-Date": "2024-01-01T00:00:00Z",
            },
        )
        writer.write_record(rec)

    for did, text in docs:
        record(
            f"https://example.com/{did}", html_page(text).encode(), "text/html; charset=utf-8", did
        )
    rid = f"<urn:uuid:{uuid.UUID(int=rng.getrandbits(128))}>"
    record("https://example.com/logo.png", b"\x89PNG\r\n\x1a\n" + bytes(64), "image/png", rid)
    path.write_bytes(buf.getvalue())
