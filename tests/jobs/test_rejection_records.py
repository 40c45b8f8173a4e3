"""Rejection sampling's outputs: the kept answers become fine-tuning records the chat reader
takes back as the same conversation (prompt/response or messages), the best by reward, and
prompts without a scorable answer are counted, not kept."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

from crucible.cluster.storage import location
from crucible.data_pipeline.chat import ChatSpec, record_prompt, record_turns
from crucible.jobs.rlhf.rejection import write_outputs


def test_best_answers_become_chat_records(tmp_path: Path) -> None:
    chat = {"messages": [{"role": "system", "content": "be brief"},
                         {"role": "user", "content": "pick"}]}  # fmt: skip
    plain = {"prompt": "say a", "system": "s", "reference": "a"}
    rows = [
        {"record": chat, "answers": [{"text": "x", "reward": 0.5}, {"text": "y", "reward": 2.0}]},
        {"record": plain, "answers": [{"text": "a", "reward": 1.0}, {"text": "b", "reward": -1}]},
        {"record": {"prompt": "none"}, "answers": [{"text": "z", "reward": -math.inf}]},
    ]
    run = location(tmp_path)
    summary = write_outputs(run, rows, Counter(), 1.0)
    assert summary["prompts"] == 3 and summary["kept"] == 2
    assert summary["skipped"] == {"no_scorable_answer": 1}
    assert summary["kept_mean_reward"] == 1.5 and summary["mean_reward"] == 2.5 / 4
    best = [json.loads(x) for x in (tmp_path / "best.jsonl").read_text().splitlines()]
    spec = ChatSpec()
    # the chat reader reads each back as the prompt's turns followed by the kept answer
    assert record_turns(best[0], spec) == [*record_prompt(chat, spec), ("assistant", "y")]
    assert record_turns(best[1], spec) == [*record_prompt(plain, spec), ("assistant", "a")]
    assert "reference" not in best[1]
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
