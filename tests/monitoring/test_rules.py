"""Prometheus rules: promtool checks them, unit-tests every alert, and they install."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from crucible.monitoring.prometheus import RULES_DIR, install_rules, rule_files

PROMTOOL = shutil.which("promtool")
pytestmark = pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed")
UNIT_TESTS = sorted((RULES_DIR / "tests").glob("*_test.yml"))


def test_promtool_check_rules() -> None:
    out = subprocess.run([PROMTOOL, "check", "rules", *map(str, rule_files())],
                         capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr


def test_promtool_unit_tests_pass() -> None:
    assert UNIT_TESTS
    out = subprocess.run([PROMTOOL, "test", "rules", *map(str, UNIT_TESTS)],
                         capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_alert_and_recording_rule_is_unit_tested() -> None:
    alerts, records = set(), set()
    for f in rule_files():
        for group in yaml.safe_load(f.read_text())["groups"]:
            for rule in group["rules"]:
                (alerts.add(rule["alert"]) if "alert" in rule else records.add(rule["record"]))
    fired, evaluated = set(), set()
    for f in UNIT_TESTS:
        for test in yaml.safe_load(f.read_text())["tests"]:
            for case in test.get("alert_rule_test", []):
                if case["exp_alerts"]:  # a test that expects it to fire (and so can fail)
                    fired.add(case["alertname"])
            evaluated |= {c["expr"] for c in test.get("promql_expr_test", [])}
    assert alerts - fired == set()
    assert records - evaluated == set()


def test_a_broken_rule_fails_the_unit_tests(tmp_path: Path) -> None:
    (tmp_path / "rules").mkdir()
    broken = (RULES_DIR / "crucible.yml").read_text().replace("> 600", "> 6000")
    (tmp_path / "rules" / "crucible.yml").write_text(broken)
    (tmp_path / "rules" / "tests").mkdir()
    shutil.copy(UNIT_TESTS[0], tmp_path / "rules" / "tests")
    out = subprocess.run([PROMTOOL, "test", "rules", str(tmp_path / "rules" / "tests" /
                          UNIT_TESTS[0].name)], capture_output=True, text=True)  # fmt: skip
    assert out.returncode != 0 and "CrucibleTrainingHung" in out.stdout + out.stderr


def test_install_rules_copies_into_the_cluster_state(tmp_path: Path) -> None:
    installed = install_rules(tmp_path, prometheus_url="http://127.0.0.1:9")  # nothing there
    assert [p.name for p in installed] == [p.name for p in rule_files()]
    assert installed[0].read_text() == rule_files()[0].read_text()
