"""PII redaction: e-mail and IP addresses replaced with placeholders, counted."""

from __future__ import annotations

import ipaddress
import re

from crucible.data_pipeline.document import Document
from crucible.data_pipeline.document_step import Step
from crucible.data_pipeline.spec import PIISpec

EMAIL_RE = re.compile(
    r"\b[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}\b"
)
IPV4_RE = re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?![\d.]|\.\d)")
IPV6_RE = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")


def redact(text: str, spec: PIISpec) -> tuple[str, int, int]:
    """(redacted text, e-mails replaced, IPs replaced).

    Args:
        text: the document text.
        spec: the placeholders.
    """
    text, n_email = EMAIL_RE.subn(spec.email_placeholder, text)
    n_ip = 0

    def ip(m: re.Match[str]) -> str:
        nonlocal n_ip
        try:
            ipaddress.ip_address(m.group(0))
        except ValueError:
            return m.group(0)  # 999.1.1.1, version strings, times: not addresses
        n_ip += 1
        return spec.ip_placeholder

    if "." in text:
        text = IPV4_RE.sub(ip, text)
    if "::" in text or text.count(":") >= 2:
        text = IPV6_RE.sub(ip, text)
    return text, n_email, n_ip


class PII(Step):
    """Replaces e-mail and IP addresses; never drops a document."""

    name = "pii"

    def __init__(self, spec: PIISpec) -> None:
        super().__init__()
        self.spec = spec

    def process(self, doc: Document) -> Document | str:
        """Redact in place."""
        text, n_email, n_ip = redact(doc.text, self.spec)
        if n_email or n_ip:
            self.stats.counters["emails"] += n_email
            self.stats.counters["ips"] += n_ip
            self.stats.counters["docs_redacted"] += 1
            doc.text = text
        return doc
