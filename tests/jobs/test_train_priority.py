"""The scheduling policy of a train job's threads (see ``crucible.jobs.train.priority``).

Each case runs in a fresh interpreter: a thread cannot leave ``SCHED_IDLE`` once in it, and
pytest's own process must keep its priority."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="Linux scheduling policy")

PROBE = """
import json, os, threading, sys
from crucible.jobs.train import priority

policy = lambda tid: "idle" if os.sched_getscheduler(tid) == os.SCHED_IDLE else "normal"
main = threading.get_native_id()
out = {}
def training():  # Ray Train runs the loop in a thread of its own, not the main one
    if sys.argv[1] == "rank":
        out["changed"] = priority.yield_rank_helpers()
    else:
        priority.yield_to_ranks()
    started = threading.Thread(target=lambda: out.update(started=policy(threading.get_native_id())))
    started.start()
    started.join()
    out.update(this=policy(threading.get_native_id()), main=policy(main))
t = threading.Thread(target=training)
t.start()
t.join()
print(json.dumps(out))
"""


def probe(mode: str, **env: str) -> dict:
    r = subprocess.run(
        [sys.executable, "-c", PROBE, mode],
        env={k: v for k, v in os.environ.items() if k != "CRUCIBLE_TRAIN_RANK"} | env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_a_rank_keeps_its_training_thread_and_idles_the_others() -> None:
    out = probe("rank")
    # The training thread and the threads it starts (gloo's, DeepSpeed's) keep their priority;
    # the main thread (Ray's signal check) yields.
    assert out["this"] == out["started"] == "normal" and out["main"] == "idle"
    assert out["changed"] >= 1


def test_the_setup_hook_idles_a_helper_process_and_leaves_a_rank_alone() -> None:
    assert probe("hook") == {"this": "idle", "started": "idle", "main": "idle"}
    assert probe("hook", CRUCIBLE_TRAIN_RANK="1") == {
        "this": "normal",
        "started": "normal",
        "main": "normal",
    }
