"""PII redaction: e-mails, IP addresses, phone numbers, payment cards, US SSNs and IBANs.

Each kind is found by a cheap pattern and confirmed by a validator before it is replaced:
libphonenumber's matcher for phones, python-stdnum's checksums for cards (Luhn), SSNs and
IBANs (mod 97), :mod:`ipaddress` for IPs. A digit string that merely looks like one (an
order number, an ISBN, a date) fails its validator and stays.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable

import phonenumbers
from stdnum import iban, luhn
from stdnum.us import ssn

from crucible.data_pipeline.document import Document
from crucible.data_pipeline.document_step import Step
from crucible.data_pipeline.spec import PIISpec

EMAIL_RE = re.compile(
    r"\b[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}\b"
)
# Left boundaries are written after a pattern's first character (``\d(?<!\w\d)``, not
# ``(?<!\w)\d``): a pattern that starts with a character class lets re skip to where that class
# matches instead of trying the whole pattern at every position (about 3x faster).
#
# A dotted quad standing alone: not glued to letters ("v1.2.3.4", "1.2.3.4b1") nor part of a
# longer dotted run; a sentence's full stop may follow.
IPV4_RE = re.compile(r"\d(?<![\w.]\d)\d{0,2}\.(?:\d{1,3}\.){2}\d{1,3}(?!\w|\.\w)")
IPV6_RE = re.compile(
    r"(?=[0-9A-Fa-f:])(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])"
)
# What marks a dotted quad as a version: a version word or a pin operator just before it
# ("version 1.2.3.4", "rev. 2.0.0.1", "pkg==1.2.3.4", "Chrome/1.2.3.4" as a product token),
# or a pre-release suffix just after it ("1.2.3.4-beta").
VERSION_BEFORE_RE = re.compile(
    r"(?:\b(?:version|ver|v|release|rel|build|rev|revision|firmware)\.?\s*[:=]?|[=~!<>]=|[A-Za-z]/)"
    r"\s*$",
    re.IGNORECASE,
)
VERSION_AFTER_RE = re.compile(r"[-+.]?(?:alpha|beta|rc|dev|pre|post|snapshot|final)\b", re.I)

# Cards as written: 13-19 digits in one run, 4-4-4-4(-3) groups, or Amex/Diners 4-6-5(4).
CARD_RE = re.compile(
    r"\d(?<![\w-]\d)(?:\d{12,18}|\d{3}([ -])\d{4}\1\d{4}\1\d{4}(?:\1\d{3})?|\d{3}([ -])\d{6}\2\d{4,5})"
    r"(?!\w|-\d)"
)
# (first digits low, high, lengths) of the card networks (ISO/IEC 7812 issuer prefixes):
# Visa, Mastercard, Amex, Diners, JCB, Discover, UnionPay, Maestro. ISBNs (978...),
# millisecond timestamps (1...) and most ids start elsewhere.
CARD_PREFIXES: tuple[tuple[int, int, tuple[int, ...]], ...] = (
    (4, 4, (13, 16, 19)),
    (51, 55, (16,)),
    (2221, 2720, (16,)),
    (34, 34, (15,)),
    (37, 37, (15,)),
    (300, 305, (14, 16, 17, 18, 19)),
    (36, 36, (14, 15, 16, 17, 18, 19)),
    (38, 39, (16, 17, 18, 19)),
    (3528, 3589, (16, 17, 18, 19)),
    (6011, 6011, (16, 17, 18, 19)),
    (644, 649, (16, 17, 18, 19)),
    (65, 65, (16, 17, 18, 19)),
    (62, 62, (16, 17, 18, 19)),
    (50, 50, (12, 13, 14, 15, 16, 17, 18, 19)),
    (56, 69, (12, 13, 14, 15, 16, 17, 18, 19)),
)
# 123-45-6789 is an SSN's own shape; 9 digits in one run or spaced only after a cue.
SSN_RE = re.compile(r"\d(?<![\w-]\d)\d{2}([- ]?)\d{2}\1\d{4}(?!\w|-\d)")
SSN_CUE_RE = re.compile(
    r"\b(?:ssn|ss#|social security(?: number| no\.?| #)?)\s*(?:is\s+)?[:#]?\s*$", re.I
)
IBAN_RE = re.compile(
    r"[A-Z](?<![A-Za-z0-9][A-Z])[A-Z]\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?(?![A-Za-z0-9])"
)
# Seven or more digits with phone punctuation between: where libphonenumber's matcher looks,
# unless the run is a date or a decimal number, which the matcher would reject at many times
# the cost.
PHONE_CANDIDATE_RE = re.compile(r"\d(?:[ \-.()/\u00a0]{0,3}\d){6,}")
NOT_PHONE_RE = re.compile(r"\d{4}([-/.])\d\d?\1\d\d?|\d\d?([-/.])\d\d?\2(?:\d\d){1,2}|\d+\.\d+")
PHONE_CONTEXT = 8  # characters either side of a candidate: '+', '(', 'ext. 12', '$'

LENIENCY = {
    "possible": phonenumbers.Leniency.POSSIBLE,
    "valid": phonenumbers.Leniency.VALID,
    "strict_grouping": phonenumbers.Leniency.STRICT_GROUPING,
    "exact_grouping": phonenumbers.Leniency.EXACT_GROUPING,
}


def is_card(digits: str) -> bool:
    """A known issuer prefix at a length it issues, and the Luhn check digit right."""
    for low, high, lengths in CARD_PREFIXES:
        if len(digits) in lengths and low <= int(digits[: len(str(low))]) <= high:
            return luhn.is_valid(digits)
    return False


def is_iban(candidate: str) -> str | None:
    """The longest valid IBAN that ``candidate`` starts with (whole space-separated groups:
    the pattern may have taken a following upper-case word as a group), or None."""
    groups = candidate.split(" ")
    for n in range(len(groups), 0, -1):
        text = " ".join(groups[:n])
        if iban.is_valid(text):
            return text
    return None


def sub_valid(
    pattern: re.Pattern[str], text: str, placeholder: str, keep: Callable[[re.Match[str]], bool]
) -> tuple[str, int]:
    """``pattern``'s matches that ``keep`` confirms replaced by ``placeholder``; (text, count)."""
    n = 0

    def replace(m: re.Match[str]) -> str:
        nonlocal n
        if not keep(m):
            return m.group(0)
        n += 1
        return placeholder

    return pattern.sub(replace, text), n


def redact_ips(text: str, spec: PIISpec) -> tuple[str, int]:
    def is_ip(m: re.Match[str]) -> bool:
        try:
            ipaddress.ip_address(m.group(0))
        except ValueError:
            return False  # 999.1.1.1, times (12:30:45)
        return True

    def is_ipv4(m: re.Match[str]) -> bool:
        before = VERSION_BEFORE_RE.search(text, max(0, m.start() - 16), m.start())
        if before or VERSION_AFTER_RE.match(text, m.end()):
            return False
        return is_ip(m)

    n4 = n6 = 0
    if "." in text:
        text, n4 = sub_valid(IPV4_RE, text, spec.ip_placeholder, is_ipv4)
    if "::" in text or text.count(":") >= 2:
        text, n6 = sub_valid(IPV6_RE, text, spec.ip_placeholder, is_ip)
    return text, n4 + n6


def redact_cards(text: str, spec: PIISpec) -> tuple[str, int]:
    return sub_valid(
        CARD_RE, text, spec.credit_card_placeholder, lambda m: is_card(re.sub(r"\D", "", m[0]))
    )


def redact_ssns(text: str, spec: PIISpec) -> tuple[str, int]:
    def keep(m: re.Match[str]) -> bool:
        if m.group(1) != "-" and not SSN_CUE_RE.search(text, max(0, m.start() - 32), m.start()):
            return False
        return ssn.is_valid(m.group(0))  # area not 000/666/9xx, group and serial not zero

    return sub_valid(SSN_RE, text, spec.us_ssn_placeholder, keep)


def redact_ibans(text: str, spec: PIISpec) -> tuple[str, int]:
    n = 0

    def replace(m: re.Match[str]) -> str:
        nonlocal n
        valid = is_iban(m.group(0))
        if valid is None:
            return m.group(0)
        n += 1
        return spec.iban_placeholder + m.group(0)[len(valid) :]

    return IBAN_RE.sub(replace, text), n


def redact_phones(text: str, spec: PIISpec) -> tuple[str, int]:
    # The matcher runs only on windows around digit runs, not over the whole text.
    windows: list[list[int]] = []
    for m in PHONE_CANDIDATE_RE.finditer(text):
        run, plus = m.group(0), text[m.start() - 1 : m.start()] == "+"
        if NOT_PHONE_RE.fullmatch(run) or (run.isdigit() and not plus):
            continue  # a date or decimal, or bare digits (rejected below as an id)
        start, end = max(0, m.start() - PHONE_CONTEXT), m.end() + PHONE_CONTEXT
        if windows and start <= windows[-1][1]:
            windows[-1][1] = end
        else:
            windows.append([start, end])
    spans: list[tuple[int, int]] = []
    leniency = LENIENCY[spec.phone_leniency]
    for start, end in windows:
        for match in phonenumbers.PhoneNumberMatcher(
            text[start:end], spec.phone_region, leniency=leniency
        ):
            raw = match.raw_string
            if raw.isdigit():
                continue  # a bare digit run with no '+' or grouping: an id, not a phone
            spans.append((start + match.start, start + match.end))
    for s, e in reversed(spans):
        text = text[:s] + spec.phone_placeholder + text[e:]
    return text, len(spans)


def redact_emails(text: str, spec: PIISpec) -> tuple[str, int]:
    if "@" not in text:
        return text, 0
    return EMAIL_RE.subn(spec.email_placeholder, text)


# In order: e-mails first (their local parts may hold digits), IBANs and cards before SSNs and
# phones (a card's digits may hold a valid phone number), IPs before phones (a dotted quad is a
# phone candidate). Placeholders hold no digits, so a replaced span is never matched again.
REDACTORS: tuple[tuple[str, Callable[[str, PIISpec], tuple[str, int]]], ...] = (
    ("email", redact_emails),
    ("iban", redact_ibans),
    ("credit_card", redact_cards),
    ("us_ssn", redact_ssns),
    ("ip", redact_ips),
    ("phone", redact_phones),
)


def redact(text: str, spec: PIISpec) -> tuple[str, dict[str, int]]:
    """(redacted text, replacements per kind) for the kinds ``spec`` switches on.

    Args:
        text: the document text.
        spec: which kinds to replace, their placeholders, the phone region.
    """
    counts: dict[str, int] = {}
    for kind, redact_kind in REDACTORS:
        if getattr(spec, kind):
            text, counts[kind] = redact_kind(text, spec)
    return text, counts


class PII(Step):
    """Replaces PII with one placeholder per kind; never drops a document."""

    name = "pii"

    def __init__(self, spec: PIISpec) -> None:
        super().__init__()
        self.spec = spec

    def process(self, doc: Document) -> Document | str:
        """Redact in place; counts per kind (``emails``, ``phones``, ...) and ``docs_redacted``."""
        text, counts = redact(doc.text, self.spec)
        if any(counts.values()):
            for kind, n in counts.items():
                if n:
                    self.stats.counters[f"{kind}s"] += n
            self.stats.counters["docs_redacted"] += 1
            doc.text = text
        return doc
