"""PII redaction: each kind found and replaced by its own placeholder, near-misses kept."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from crucible.data_pipeline.document import Document
from crucible.data_pipeline.pii import PII, is_card, redact
from crucible.data_pipeline.spec import PIISpec

US = PIISpec()
GB = PIISpec(phone_region="GB")


def found(text: str, spec: PIISpec = US) -> dict[str, int]:
    return {kind: n for kind, n in redact(text, spec)[1].items() if n}


def test_email_and_ip() -> None:
    text = "Mail jane.doe@example.org or 10.0.0.1 or 2001:db8::1; not 999.1.1.1 nor 12:30."
    out, counts = redact(text, US)
    assert out == "Mail <EMAIL> or <IP_ADDRESS> or <IP_ADDRESS>; not 999.1.1.1 nor 12:30."
    assert (counts["email"], counts["ip"]) == (1, 2)


@pytest.mark.parametrize(
    ("text", "spec", "out"),
    [
        ("Call +1 (415) 555-0132 today.", US, "Call <PHONE> today."),
        ("Ring 415-555-2671 or (415) 555-2671.", US, "Ring <PHONE> or <PHONE>."),
        ("Tel. 020 7946 0958, ask for Sam.", GB, "Tel. <PHONE>, ask for Sam."),
        ("From abroad: +44 20 7946 0958.", US, "From abroad: <PHONE>."),
        ("+14155552671 is mine", US, "<PHONE> is mine"),
        ("Visa 4111 1111 1111 1111 exp 12/27", US, "Visa <CREDIT_CARD> exp 12/27"),
        ("card=5555555555554444;", US, "card=<CREDIT_CARD>;"),
        ("Amex 3782-822463-10005.", US, "Amex <CREDIT_CARD>."),
        ("SSN 536-22-1234 on file", US, "SSN <US_SSN> on file"),
        ("her ssn: 536221234.", US, "her ssn: <US_SSN>."),
        ("IBAN GB82 WEST 1234 5698 7654 32.", US, "IBAN <IBAN>."),
        ("to DE89370400440532013000 now", US, "to <IBAN> now"),
        ("ES91 2100 0418 4502 0005 1332 EURO", US, "<IBAN> EURO"),
        ("Server at 192.168.1.20.", US, "Server at <IP_ADDRESS>."),
        ("ssh root@10.0.0.7", US, "ssh root@<IP_ADDRESS>"),
    ],
)
def test_each_kind_found(text: str, spec: PIISpec, out: str) -> None:
    assert redact(text, spec)[0] == out


@pytest.mark.parametrize(
    "text",
    [
        # versions
        "Upgrade to version 1.2.3.4 now.",
        "Built with v1.2.3.4 and rev. 2.0.0.1",
        "pin requests==1.2.3.4 or pkg>=10.0.0.1",
        "User agent Chrome/1.2.3.4 Safari",
        "the 1.2.3.4-beta release",
        "see 1.2.3.4.5 notes",
        # dates and timestamps
        "Published 2023-01-15 08:30:00, updated 15.01.2023.",
        "At 2023-01-15T08:30:00Z (12/03/2023 10:15).",
        "epoch 1700000000, ms 1700000000123",
        # order numbers, ISBNs, long ids
        "Order #A-5521-3342 and order 12345678901 shipped.",
        "Invoice INV-2023-097983 (digits valid as a US number, not grouped as one)",
        "ISBN-10 7-487-27929-4",
        "ISBN 978-0-306-40615-7, 9780306406157, 9783070000064, 0-306-40615-2",
        "id 4111111111111112 and tweet 1458392847562938475",
        # invalid SSNs, cards, IBANs
        "000-12-3456, 666-12-3456, 912-34-5678, 536-00-1234, 536-22-0000",
        "ref 536221234 and 536 22 1234",
        "4111 1111 1111 1112 and 1234 5678 9012 3456",
        "GB00 WEST 1234 5698 7654 32",
        "pages 234-567 and 555-0132",
    ],
)
def test_near_misses_kept(text: str) -> None:
    assert redact(text, US)[0] == text


def test_phone_region() -> None:
    assert found("020 7946 0958", US) == {}
    assert found("020 7946 0958", GB) == {"phone": 1}


def test_is_card_needs_issuer_prefix_and_length() -> None:
    assert is_card("4111111111111111")
    assert not is_card("4111111111111112")  # Luhn
    assert not is_card("9783070000064")  # an ISBN-13 that passes Luhn: no issuer starts 97
    assert not is_card("3782822463100003")  # passes Luhn, but Amex numbers have 15 digits


def test_step_counts_per_kind() -> None:
    docs = [
        Document("a", "Mail a@b.org, call +1 415-555-2671, card 4111111111111111.", "s"),
        Document("b", "IBAN GB82WEST12345698765432, SSN 536-22-1234, host 10.0.0.1", "s"),
        Document("c", "No PII here: version 1.2.3.4.", "s"),
    ]
    step = PII(US)
    out = list(step.run(docs))
    assert [d.text for d in out] == [
        "Mail <EMAIL>, call <PHONE>, card <CREDIT_CARD>.",
        "IBAN <IBAN>, SSN <US_SSN>, host <IP_ADDRESS>",
        "No PII here: version 1.2.3.4.",
    ]
    assert dict(step.stats.counters) == {
        "emails": 1,
        "phones": 1,
        "credit_cards": 1,
        "ibans": 1,
        "us_ssns": 1,
        "ips": 1,
        "docs_redacted": 2,
    }
    assert out[0].nbytes == len(out[0].text.encode())


def test_switches() -> None:
    text = "a@b.org +1 415-555-2671 4111111111111111 536-22-1234 GB82WEST12345698765432 10.0.0.1"
    everything = {"email", "phone", "credit_card", "us_ssn", "iban", "ip"}
    assert set(found(text)) == everything
    for kind in everything:
        spec = PIISpec(**{kind: False})
        assert set(found(text, spec)) == everything - {kind}
    off = PIISpec(**dict.fromkeys(everything, False))
    assert redact(text, off)[0] == text


def test_placeholders_and_leniency_configurable() -> None:
    spec = PIISpec(phone_placeholder="[tel]", phone_leniency="exact_grouping")
    assert redact("call 415-555-2671", spec)[0] == "call [tel]"


def test_unknown_phone_region_rejected() -> None:
    with pytest.raises(ValidationError, match="phone_region"):
        PIISpec(phone_region="XX")
