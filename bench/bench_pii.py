"""Benchmark: PII redaction quality (precision, recall per kind) and cost (MB/s per core).

Quality: a planted set of PII items (e-mails, IPs, phones, payment cards, US SSNs, IBANs) and
of near-misses (version strings, dates, timestamps, order numbers, ISBNs, long numeric ids,
tracking numbers, checksum-failing cards/SSNs/IBANs), each set in a sentence of prose. An item
counts as found when exactly it became its kind's placeholder; a placeholder of another kind,
or one in a near-miss sentence, is a false positive of that kind. The old redaction (e-mails
and IPs only, as before phones/cards/SSNs/IBANs were added) runs on the same set.

Cost: real text found on this machine (the documentation files of the standard library and
installed packages) with sparse planted PII (about one item per 5 documents), redacted by the
old and the new code side by side, runs interleaved, one core. Rows for the new code with only
e-mails and IPs on, and with one kind at a time, show where the time goes.

    python bench/bench_pii.py [--mbytes 4] [--per-kind 300] [--repeats 3] [--seed 0]
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import sysconfig
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import phonenumbers
from stdnum import ean, iban, isbn, luhn

from crucible.data_pipeline.pii import redact
from crucible.data_pipeline.spec import PIISpec

KINDS = ("email", "ip", "phone", "credit_card", "us_ssn", "iban")

# The redaction before this change, kept here as the baseline.
OLD_EMAIL_RE = re.compile(
    r"\b[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}\b"
)
OLD_IPV4_RE = re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?![\d.]|\.\d)")
OLD_IPV6_RE = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")


def old_redact(text: str, spec: PIISpec) -> tuple[str, dict[str, int]]:
    text, n_email = OLD_EMAIL_RE.subn(spec.email_placeholder, text)
    n_ip = 0

    def ip(m: re.Match[str]) -> str:
        nonlocal n_ip
        try:
            ipaddress.ip_address(m.group(0))
        except ValueError:
            return m.group(0)
        n_ip += 1
        return spec.ip_placeholder

    if "." in text:
        text = OLD_IPV4_RE.sub(ip, text)
    if "::" in text or text.count(":") >= 2:
        text = OLD_IPV6_RE.sub(ip, text)
    return text, {"email": n_email, "ip": n_ip}


class Planter:
    """Random PII items and near-misses, each as (sentence prefix, item, sentence suffix)."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def pick(self, xs: list | tuple):
        return xs[int(self.rng.integers(len(xs)))]

    def digits(self, n: int, first: str = "0123456789") -> str:
        return self.pick(first) + "".join(str(d) for d in self.rng.integers(0, 10, n - 1))

    # -- positives ------------------------------------------------------------------------
    def email(self) -> tuple[str, str, str]:
        user = self.pick(["jane.doe", "j.smith", "mike_r", "anna+news", "info", "k.lee42"])
        dom = self.pick(["example.org", "mail.co.uk", "uni-bonn.de", "acme.io", "gmail.com"])
        return self.pick(["Write to ", "Contact: ", "email me at "]), f"{user}@{dom}", "."

    def ip(self) -> tuple[str, str, str]:
        if self.rng.random() < 0.2:
            item = str(ipaddress.IPv6Address(int(self.rng.integers(0, 2**63)) << 64 | 1))
        else:
            item = ".".join(str(int(x)) for x in self.rng.integers(1, 255, 4))
        return self.pick(["Server at ", "Failed login from ", "ping ", "host="]), item, " today."

    def phone(self) -> tuple[str, str, str]:
        while True:  # a number the numbering plan allows, written as people write it
            region, cc, nsn = self.pick(
                [
                    (
                        "US",
                        1,
                        self.pick(["415", "212", "617", "312", "206"]) + self.digits(7, "23456789"),
                    ),
                    ("GB", 44, "20" + self.digits(8, "378")),
                    ("GB", 44, "7" + self.digits(9, "4579")),
                    ("DE", 49, "30" + self.digits(8, "123456789")),
                    ("FR", 33, self.pick("1234567") + self.digits(8)),
                ]
            )
            num = phonenumbers.parse(f"+{cc}{nsn}")
            if phonenumbers.is_valid_number(num):
                break
        fmt = phonenumbers.PhoneNumberFormat
        styles = [fmt.INTERNATIONAL, fmt.E164] + [fmt.NATIONAL] * 2 * (region == "US")
        item = phonenumbers.format_number(num, self.pick(styles))
        if region == "US" and self.rng.random() < 0.3:
            item = self.pick(["{}-{}-{}", "{}.{}.{}", "{}{}{}"]).format(nsn[:3], nsn[3:6], nsn[6:])
        return self.pick(["Call ", "Tel: ", "Reach me on ", "ph. "]), item, " after 5pm."

    def credit_card(self) -> tuple[str, str, str]:
        prefix, n = self.pick(
            [("4", 16), ("51", 16), ("55", 16), ("2221", 16), ("34", 15), ("37", 15), ("6011", 16)]
        )
        body = prefix + self.digits(n - len(prefix) - 1)
        number = body + luhn.calc_check_digit(body)
        if n == 15:
            groups = [number[:4], number[4:10], number[10:]]
        else:
            groups = [number[i : i + 4] for i in range(0, n, 4)]
        item = self.pick([" ", "-", ""]).join(groups)
        return (
            self.pick(["Card number ", "Paid with ", "cc: "]),
            item,
            self.pick([".", " exp 09/27"]),
        )

    def us_ssn(self) -> tuple[str, str, str]:
        area = int(self.rng.integers(1, 900))
        while area == 666:
            area = int(self.rng.integers(1, 900))
        item = f"{area:03d}-{int(self.rng.integers(1, 100)):02d}-{int(self.rng.integers(1, 10000)):04d}"
        r = self.rng.random()
        if r < 0.15:
            return "SSN: ", item.replace("-", ""), "."  # bare, after a cue
        if r < 0.25:
            return "her number is ", item.replace("-", " "), "."  # spaced, no cue: missed by design
        return self.pick(["SSN ", "social security number ", "Applicant "]), item, " on file."

    def iban(self) -> tuple[str, str, str]:
        while True:
            cc, bban = self.pick(
                [
                    ("DE", self.digits(18)),
                    ("GB", self.pick(["WEST", "NWBK", "BARC"]) + self.digits(14)),
                    ("NL", self.pick(["ABNA", "INGB", "RABO"]) + self.digits(10)),
                    ("AT", self.digits(16)),
                    ("CH", self.digits(17)),
                ]
            )
            number = cc + iban.calc_check_digits(cc + "00" + bban) + bban
            if iban.is_valid(number):
                break
        item = number if self.rng.random() < 0.3 else iban.format(number)
        return self.pick(["IBAN ", "Transfer to ", "Account: "]), item, " by Friday."

    # -- near-misses ----------------------------------------------------------------------
    def isbn13(self) -> str:
        body = "978" + self.digits(9)
        return body + ean.calc_check_digit(body)

    def near_miss(self) -> tuple[str, str, str, str]:
        """(category, prefix, item, suffix)."""
        q = ".".join(str(int(x)) for x in self.rng.integers(0, 20, 4))
        s9 = self.digits(9, "123456789")
        cat, pre, item = self.pick(
            [
                ("version", "Upgrade to version ", q),
                ("version", "Built with v", q),
                ("version", "pip install pkg==", q),
                ("version", "Mozilla/5.0 Chrome/", f"120.0.{self.digits(4)}.{self.digits(3)}"),
                ("version", "Release ", f"{q}-beta"),
                ("version", "Windows ", f"10.0.{self.digits(5, '12')}.{self.digits(3)}"),
                ("version", "Updated the driver to ", q),  # no cue: a known miss of the rule
                ("date", "Published ", f"2023-{self.digits(2, '01')}-{self.digits(2, '12')}"),
                ("date", "Dated ", f"{self.digits(2, '12')}.{self.digits(2, '01')}.2021"),
                ("date", "On ", f"{self.digits(2, '01')}/{self.digits(2, '12')}/2019"),
                ("timestamp", "at ", f"2023-01-15T{self.digits(2, '01')}:30:00Z"),
                (
                    "timestamp",
                    "logged ",
                    f"2024-03-0{self.digits(1, '1234')} 08:1{self.digits(1)}:45.123",
                ),
                ("timestamp", "epoch ", "17" + self.digits(8)),
                ("timestamp", "ts_ms=", "17" + self.digits(11)),
                ("order", "Order #", f"{self.digits(3)}-{self.digits(7)}-{self.digits(7)}"),
                ("order", "order ", self.digits(11, "123456789")),
                ("order", "Invoice INV-2023-", self.digits(6)),
                ("order", "PO ", "45" + self.digits(8)),
                ("isbn", "ISBN ", self.isbn13()),
                ("isbn", "ISBN ", isbn.format(self.isbn13())),
                ("isbn", "ISBN-10 ", isbn.format(isbn.to_isbn10(self.isbn13()))),
                ("long_id", "id=", self.digits(int(self.rng.integers(12, 21)), "123456789")),
                ("long_id", "tracking 1Z", f"{self.digits(6)}AA{self.digits(8)}"),
                (
                    "long_id",
                    "USPS ",
                    " ".join(["9400"] + [self.digits(4) for _ in range(4)] + ["12"]),
                ),
                ("bad_checksum", "card ", f"4111 1111 1111 {self.digits(4)}"),
                (
                    "bad_checksum",
                    "SSN ",
                    f"{self.pick(['000', '666', '9' + self.digits(2)])}-{s9[3:5]}-{s9[5:]}",
                ),
                (
                    "bad_checksum",
                    "IBAN ",
                    "GB00 WEST " + " ".join(self.digits(4) for _ in range(3)) + " 32",
                ),
                ("short_number", "extension ", f"555-{self.digits(4)}"),
                ("short_number", "ZIP ", f"{self.digits(5)}-{self.digits(4)}"),
                ("short_number", "pages ", f"{self.digits(3)}-{self.digits(3)}"),
                (
                    "short_number",
                    "price $",
                    f"{self.digits(1, '123456789')},{self.digits(3)},{self.digits(3)}.99",
                ),
                ("short_number", "pi is ", "3.14159265358979"),
            ]
        )
        if cat == "bad_checksum" and pre == "card ":
            digits = item.replace(" ", "")
            if luhn.is_valid(digits):  # keep it failing
                item = item[:-1] + str((int(item[-1]) + 1) % 10)
        return cat, pre, item, self.pick([" and more.", ".", " (see below)"])


PROSE = (
    "The committee met on Tuesday to review the proposal. ",
    " She said the results were encouraging but that more work was needed.",
)


def quality(
    redactor: Callable[[str, PIISpec], tuple[str, dict[str, int]]],
    spec: PIISpec,
    positives: list[tuple[str, str, str, str]],
    negatives: list[tuple[str, str, str, str]],
) -> tuple[dict, Counter]:
    """Per kind (tp, fp, fn) and near-miss false positives per category."""
    placeholder = {k: getattr(spec, f"{k}_placeholder") for k in KINDS}
    tp, fp, fn = Counter(), Counter(), Counter()
    fp_by_cat: Counter[str] = Counter()
    for kind, pre, item, post in positives:
        out, _ = redactor(PROSE[0] + pre + item + post + PROSE[1], spec)
        if out == PROSE[0] + pre + placeholder[kind] + post + PROSE[1]:
            tp[kind] += 1
        else:
            fn[kind] += 1
            for k in KINDS:
                if k != kind and placeholder[k] in out:
                    fp[k] += 1
    for cat, pre, item, post in negatives:
        out, _ = redactor(PROSE[0] + pre + item + post + PROSE[1], spec)
        for k in KINDS:
            if placeholder[k] in out:
                fp[k] += 1
                fp_by_cat[cat] += 1
    return {k: (tp[k], fp[k], fn[k]) for k in KINDS}, fp_by_cat


def corpus(mbytes: float) -> list[str]:
    """Documents of 1–8 KiB cut from real prose files, up to ``mbytes`` MB in all."""
    roots = [Path(sysconfig.get_paths()["stdlib"]), Path(sysconfig.get_paths()["purelib"])]
    files = sorted(p for r in roots for p in r.rglob("*") if p.suffix in {".md", ".rst", ".txt"})
    rng = np.random.default_rng(0)
    docs, total = [], 0
    for f in files:
        try:
            text = f.read_text()
        except (UnicodeDecodeError, OSError):
            continue
        while text and total < mbytes * 1e6:
            n = int(rng.integers(1024, 8192))
            docs.append(text[:n])
            total += len(text[:n].encode())
            text = text[n:]
        if total >= mbytes * 1e6:
            break
    return docs


def best_of(repeats: int, *fns: Callable[[], object]) -> list[float]:
    """The shortest of ``repeats`` interleaved timed runs of each of ``fns`` (seconds)."""
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, t in zip(fns, times, strict=True):
            t0 = time.perf_counter()
            fn()
            t.append(time.perf_counter() - t0)
    return [min(t) for t in times]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mbytes", type=float, default=4.0)
    ap.add_argument("--per-kind", type=int, default=300, help="planted items per kind")
    ap.add_argument("--near-misses", type=int, default=3000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    planter = Planter(args.seed)
    spec = PIISpec()
    positives = [(k, *getattr(planter, k)()) for k in KINDS for _ in range(args.per_kind)]
    negatives = [planter.near_miss() for _ in range(args.near_misses)]

    print(
        f"quality: {args.per_kind} planted items per kind, {len(negatives)} near-misses, "
        f"phone_region={spec.phone_region}, leniency={spec.phone_leniency}"
    )
    print(f"  {'kind':12s} {'old P':>7s} {'old R':>7s} {'new P':>7s} {'new R':>7s}   new tp/fp/fn")
    results = {
        name: quality(fn, spec, positives, negatives)
        for name, fn in (("old", old_redact), ("new", redact))
    }

    def pr(t: tuple[int, int, int]) -> tuple[str, str]:
        tp, fp, fn = t
        p = f"{tp / (tp + fp):7.3f}" if tp + fp else "      -"
        return p, f"{tp / (tp + fn):7.3f}"

    for k in KINDS:
        (op, orr), (np_, nr) = pr(results["old"][0][k]), pr(results["new"][0][k])
        print(f"  {k:12s} {op} {orr} {np_} {nr}   {'/'.join(map(str, results['new'][0][k]))}")
    cats = Counter(c for c, *_ in negatives)
    print("  near-miss sentences given a placeholder, by category (old -> new):")
    for c in sorted(cats):
        print(f"    {c:13s} {results['old'][1][c]:4d} -> {results['new'][1][c]:4d}  of {cats[c]}")

    # Cost: sparse PII in real text.
    docs = corpus(args.mbytes)
    rng = np.random.default_rng(args.seed)
    for i in range(0, len(docs), 5):
        _, pre, item, post = positives[int(rng.integers(len(positives)))]
        cut = int(rng.integers(len(docs[i])))
        docs[i] = docs[i][:cut] + " " + pre + item + post + " " + docs[i][cut:]
    mb = sum(len(d.encode()) for d in docs) / 1e6

    def run(fn: Callable[[str, PIISpec], object], s: PIISpec) -> Callable[[], None]:
        return lambda: [fn(d, s) for d in docs] and None

    only = {k: PIISpec(**{o: o == k for o in KINDS}) for k in KINDS}
    email_ip = PIISpec(phone=False, credit_card=False, us_ssn=False, iban=False)
    fns = [run(old_redact, spec), run(redact, email_ip), run(redact, spec)]
    fns += [run(redact, only[k]) for k in KINDS]
    for fn in fns:
        fn()  # warm up (phonenumbers loads its metadata lazily)
    times = best_of(args.repeats, *fns)
    t_old, t_email_ip, t_new = times[:3]
    print(
        f"cost: {len(docs):,} documents, {mb:.2f} MB of real text, one PII item per ~5 "
        f"documents, one core, best of {args.repeats} "
        f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)"
    )
    print(f"  old (e-mail + IP)              : {mb / t_old:8.2f} MB/s")
    print(f"  new, e-mail + IP only          : {mb / t_email_ip:8.2f} MB/s")
    print(f"  new, all six kinds             : {mb / t_new:8.2f} MB/s")
    print(f"  ratio new all / old            : {t_old / t_new:8.3f}  (throughput)")
    print(f"  ratio new all / new e-mail + IP: {t_email_ip / t_new:8.3f}  (the four new kinds)")
    for k, t in zip(KINDS, times[3:], strict=True):
        print(f"    new, {k:12s} alone        : {mb / t:8.2f} MB/s")


if __name__ == "__main__":
    main()
