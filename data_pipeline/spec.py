"""The ``data:`` section of a run spec: inputs, per-step options, dedup, shards.

Defaults are the published ones (Gopher, C4, FineWeb, FineWeb's MinHash); every filter can be
switched off with ``enabled: false`` and every threshold set to ``null`` to skip that rule.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, model_validator

from crucible.config import StrictModel
from crucible.data_pipeline.chat import ChatSpec
from crucible.data_pipeline.shards.spec import ShardSpec


class ReaderSpec(StrictModel):
    """How input files are read."""

    text_key: str = Field("text", description="JSONL/Parquet field holding the document text.")
    id_key: str = Field("id", description="Field holding a document id; derived when absent.")
    url_key: str = Field("url", description="Field holding the document URL, if any.")
    max_doc_bytes: int = Field(
        256 * 1024 * 1024,
        ge=1,
        description="Documents larger than this (UTF-8 bytes) are excluded as read/too_large.",
    )
    batch_size: int = Field(1000, ge=1, description="Documents per block passed between steps.")
    metadata: Literal["all", "none"] | list[str] = Field(
        "all",
        description="Input fields kept with each document besides text, id and url: 'all', "
        "'none' or a list of names (JSONL/Parquet fields as named; WARC headers lower-cased "
        "with '_', e.g. warc_date, warc_target_uri, warc_record_id, "
        "warc_identified_content_language; HTTP ones as http_content_type, "
        "http_content_language).",
    )
    chat: ChatSpec | None = Field(
        None,
        description="Instruction data: each JSONL/Parquet record is a conversation (messages, "
        "or prompt/response) rendered with a chat template into the document text; the shards "
        "then train only the assistant's turns. null: records are plain documents.",
    )


class NormalizeSpec(StrictModel):
    """Unicode NFC and whitespace clean-up."""

    enabled: bool = True
    form: Literal["NFC", "NFKC"] = Field("NFC", description="Unicode normal form.")


class LanguageSpec(StrictModel):
    """Language identification: every document is labelled; ``keep`` decides what is dropped."""

    enabled: bool = True
    model: Literal["fasttext", "heliport"] = Field(
        "fasttext",
        description="fasttext: lid.176.ftz, 176 languages; heliport: HeLI-OTS 2.0, 220 languages, "
        "more accurate, GPL-3.0, ~850 MB per process (pip install 'crucible[langid]'). Both "
        "ship in their wheels; nothing is downloaded.",
    )
    keep: list[str] | None = Field(
        default_factory=lambda: ["en"],
        description="ISO 639-1 or 639-3 codes kept (other languages dropped as other_language); "
        "null keeps every document, whatever its language or score (still labelled).",
    )
    min_score: float | None = Field(
        None,
        ge=0.0,
        description="Only with keep: a document of a kept language scoring below this is dropped "
        "(low_score). The scale is the model's: fasttext a probability (0-1), heliport a "
        "confidence (>= 0, typically 0-5). null: the model's own cut (heliport's per-language "
        "thresholds; fasttext 0.65).",
    )

    @model_validator(mode="after")
    def _probability_for_fasttext(self) -> LanguageSpec:
        if self.model == "fasttext" and self.min_score is not None and self.min_score > 1.0:
            raise ValueError("min_score is a probability for model: fasttext (at most 1.0)")
        return self


class GopherQualitySpec(StrictModel):
    """Gopher quality rules (Rae et al. 2021, appendix A), datatrove's definitions."""

    enabled: bool = True
    min_doc_words: int | None = 50
    max_doc_words: int | None = 100_000
    min_avg_word_length: float | None = 3
    max_avg_word_length: float | None = 10
    max_symbol_word_ratio: float | None = 0.1
    max_bullet_lines_ratio: float | None = 0.9
    max_ellipsis_lines_ratio: float | None = 0.3
    max_non_alpha_words_ratio: float | None = Field(
        0.8, description="Minimum fraction of words containing a letter (datatrove's name)."
    )
    min_stop_words: int | None = 2
    stop_words: list[str] = Field(
        default_factory=lambda: ["the", "be", "to", "of", "and", "that", "have", "with"]
    )


class GopherRepetitionSpec(StrictModel):
    """Gopher repetition rules (Rae et al. 2021, table A1)."""

    enabled: bool = True
    dup_line_frac: float | None = 0.3
    dup_para_frac: float | None = 0.3
    dup_line_char_frac: float | None = 0.2
    dup_para_char_frac: float | None = 0.2
    top_n_grams: list[tuple[int, float]] = Field(
        default_factory=lambda: [(2, 0.2), (3, 0.18), (4, 0.16)]
    )
    dup_n_grams: list[tuple[int, float]] = Field(
        default_factory=lambda: [(5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10)]
    )


class C4Spec(StrictModel):
    """C4 line and page rules (Raffel et al. 2020; tfds c4_utils), datatrove's defaults."""

    enabled: bool = True
    remove_citations: bool = True
    filter_no_terminal_punct: bool = True
    min_num_sentences: int | None = 5
    min_words_per_line: int | None = 3
    max_word_length: int | None = 1000
    filter_lorem_ipsum: bool = True
    filter_javascript: bool = True
    filter_curly_bracket: bool = True
    filter_policy: bool = True


class FineWebSpec(StrictModel):
    """FineWeb quality rules (Penedo et al. 2024), datatrove's defaults."""

    enabled: bool = True
    line_punct_thr: float | None = 0.12
    line_punct_exclude_zero: bool = False
    short_line_thr: float | None = 0.67
    short_line_length: int = 30
    char_duplicates_ratio: float | None = 0.01
    new_line_ratio: float | None = 0.3


class PIISpec(StrictModel):
    """PII redaction: each kind found by a cheap pattern, confirmed by a validator (checksum,
    numbering plan, address parser) and replaced by its own placeholder."""

    enabled: bool = True
    email: bool = Field(True, description="Replace e-mail addresses.")
    ip: bool = Field(
        True, description="Replace IPv4/IPv6 addresses (dotted quads marked as versions are kept)."
    )
    phone: bool = Field(True, description="Replace phone numbers (libphonenumber's matcher).")
    credit_card: bool = Field(
        True, description="Replace payment card numbers (known issuer prefix and length, Luhn)."
    )
    us_ssn: bool = Field(
        True,
        description="Replace US social security numbers (written 123-45-6789, or after 'SSN').",
    )
    iban: bool = Field(True, description="Replace IBANs (country format and mod-97 checksum).")
    email_placeholder: str = "<EMAIL>"
    ip_placeholder: str = "<IP_ADDRESS>"
    phone_placeholder: str = "<PHONE>"
    credit_card_placeholder: str = "<CREDIT_CARD>"
    us_ssn_placeholder: str = "<US_SSN>"
    iban_placeholder: str = "<IBAN>"
    phone_region: str = Field(
        "US",
        description="Region (ISO 3166 alpha-2) of numbers written without a '+' country code; "
        "'+44 20 7946 0958' is found whatever it is, '020 7946 0958' only with 'GB'.",
    )
    phone_leniency: Literal["possible", "valid", "strict_grouping", "exact_grouping"] = Field(
        "strict_grouping",
        description="libphonenumber's matcher leniency: 'valid' accepts numbers valid in their "
        "region's numbering plan, 'strict_grouping' also requires digit groups the region uses "
        "(it keeps 'INV-2023-097983' and ISBN-10s), 'exact_grouping' its exact format.",
    )

    @model_validator(mode="after")
    def _known_region(self) -> PIISpec:
        import phonenumbers

        if self.phone_region not in phonenumbers.SUPPORTED_REGIONS:
            raise ValueError(
                f"phone_region {self.phone_region!r} is not a region libphonenumber knows"
            )
        return self


class ExactDedupSpec(StrictModel):
    """Global exact dedup on hashes of the normalised text."""

    enabled: bool = True


class MinHashSpec(StrictModel):
    """MinHash LSH fuzzy dedup; the defaults are FineWeb's (5-grams, 14 bands x 8 rows)."""

    enabled: bool = True
    n_grams: int = Field(5, ge=1, description="Words per shingle.")
    num_bands: int = Field(14, ge=1, description="LSH bands (buckets).")
    rows_per_band: int = Field(8, ge=1, description="Hashes per band.")
    seed: int = Field(1, description="Seed of the permutation parameters.")
    threshold: float = Field(
        0.8,
        ge=0.0,
        le=1.0,
        description="Minimum Jaccard of a duplicate pair: LSH candidates are checked against "
        "it (0 keeps every candidate).",
    )
    verify: Literal["exact", "signature"] = Field(
        "exact",
        description="How candidates are checked: 'signature' compares the MinHash estimate "
        "(fraction of equal signature values) with the threshold; 'exact' also computes the "
        "exact shingle Jaccard of pairs whose estimate is within 3 standard errors of it.",
    )
    max_rounds: int = Field(64, ge=1, description="Cap on connected-components rounds.")

    @property
    def num_perm(self) -> int:
        """Total number of permutations (bands x rows)."""
        return self.num_bands * self.rows_per_band

    @property
    def margin(self) -> float:
        """Half-width of the band of estimates that get an exact check (0 for 'signature')."""
        if self.verify == "signature":
            return 0.0
        t = self.threshold
        return 3.0 * (t * (1.0 - t) / self.num_perm) ** 0.5


class DedupSpec(StrictModel):
    """Exact and fuzzy dedup."""

    exact: ExactDedupSpec = Field(default_factory=ExactDedupSpec)
    minhash: MinHashSpec = Field(default_factory=MinHashSpec)


class EvalSetSpec(StrictModel):
    """One evaluation set that training documents must not overlap."""

    paths: list[str] = Field(
        description="Files, directories or globs of .jsonl[.gz|.zst], .parquet or .txt[.gz|.zst]; "
        "a .txt file is one text."
    )
    fields: list[str] = Field(
        default_factory=lambda: ["text"],
        description="JSONL/Parquet fields of a record joined in order into one text (e.g. "
        "[question, answer]: n-grams within each and across the two); dots reach nested fields, "
        "a list value is joined, a missing field skipped.",
    )

    @model_validator(mode="after")
    def _has_paths(self) -> EvalSetSpec:
        if not self.paths or not self.fields:
            raise ValueError("an eval set needs at least one path and one field")
        return self


class DecontaminationSpec(StrictModel):
    """Drop (or mark) training documents sharing a word n-gram with an evaluation set (GPT-3,
    Brown et al. 2020, appendix C: 13-grams); disabled while no eval set is given."""

    eval_sets: dict[str, EvalSetSpec] = Field(
        default_factory=dict,
        description="Eval sets by name; the name is in the stats and the exclusion rule "
        "(decontaminate/<name>).",
    )
    n_grams: int = Field(13, ge=1, description="Words per n-gram (normalised as MinHash's).")
    action: Literal["drop", "mark"] = Field(
        "drop",
        description="'drop' excludes contaminated documents; 'mark' keeps them and only counts "
        "and audits them.",
    )

    @property
    def enabled(self) -> bool:
        """Whether any eval set is given."""
        return bool(self.eval_sets)

    @model_validator(mode="after")
    def _set_names(self) -> DecontaminationSpec:
        for name in self.eval_sets:
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
                raise ValueError(f"eval set name {name!r}: use letters, digits, '_', '.', '-'")
        return self


class OutputSpec(StrictModel):
    """What the run writes."""

    exclusion_text: bool = Field(
        True, description="Keep the text of dropped documents in the exclusion record."
    )
    max_exclusion_text_chars: int = Field(
        10_000, ge=0, description="Exclusion texts are cut to this many characters."
    )


class DataSpec(StrictModel):
    """The ``data:`` section: raw text in, clean deduplicated documents (and shards) out."""

    inputs: list[str] = Field(
        description="Files, directories or glob patterns of .jsonl[.gz|.zst], .parquet, "
        ".warc[.gz], .wet[.gz] inputs."
    )
    reader: ReaderSpec = Field(default_factory=ReaderSpec)
    normalize: NormalizeSpec = Field(default_factory=NormalizeSpec)
    language: LanguageSpec = Field(default_factory=LanguageSpec)
    gopher_repetition: GopherRepetitionSpec = Field(default_factory=GopherRepetitionSpec)
    gopher_quality: GopherQualitySpec = Field(default_factory=GopherQualitySpec)
    c4: C4Spec = Field(default_factory=C4Spec)
    fineweb: FineWebSpec = Field(default_factory=FineWebSpec)
    pii: PIISpec = Field(default_factory=PIISpec)
    dedup: DedupSpec = Field(default_factory=DedupSpec)
    decontaminate: DecontaminationSpec = Field(default_factory=DecontaminationSpec)
    output: OutputSpec = Field(default_factory=OutputSpec)
    num_workers: int | None = Field(
        None, ge=1, description="Parallel file tasks on Ray (null: one per CPU)."
    )
    partition_bytes: int = Field(
        64 << 20,
        ge=4096,
        description="On Ray: target bytes per shuffle partition and block; bounds each task's "
        "memory (a few times this, plus the interpreter) whatever the corpus size. A shuffle has "
        "at least one partition per CPU, so its tasks reach the bound once its data is larger "
        "than CPUs times this.",
    )
    shards: ShardSpec | None = Field(
        None, description="Training shards built from the documents; null stops at documents."
    )

    @model_validator(mode="after")
    def _has_inputs(self) -> DataSpec:
        if not self.inputs:
            raise ValueError("inputs is empty; list at least one file, directory or glob")
        return self
