"""Instruction data: prompt/response or chat records rendered into one text with a named
template, and that text cut back into the turns the loss is taken on.

The rendered text is the document every pipeline step sees (filters, PII, dedup work on it
unchanged), so the template's markers are the only structure: a record whose content already
contains a marker is refused at read time, and the shard build splits the text at the markers
again, after PII replacement, to mark which tokens are trained (the assistant's turns and
their end marker: the model learns what to say and when to stop).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field

from crucible.config import StrictModel

ROLES = ("system", "user", "assistant")
CANDIDATE = "candidate"  # the pseudo-role whose header opens each answer of a comparison


@dataclass(frozen=True)
class Template:
    """How turns are written: ``begin.format(role=...)`` + content + ``end``."""

    name: str
    begin: str
    end: str

    def header(self, role: str) -> str:
        """The text that opens a turn of ``role``."""
        return self.begin.format(role=role)

    @property
    def markers(self) -> tuple[str, ...]:
        """Strings that must not occur inside content (they would forge turns)."""
        return (*(self.header(r) for r in (*ROLES, CANDIDATE)), self.end)


TEMPLATES = {
    # ChatML (OpenAI; Qwen, many open chat models): the markers are plain text to a tokenizer
    # that does not know them as special tokens, a few tokens each.
    "chatml": Template("chatml", "<|im_start|>{role}\n", "<|im_end|>\n"),
    # Alpaca-like headers, readable in a plain completion model's context.
    "plain": Template("plain", "### {role}:\n", "\n\n"),
}


class ChatSpec(StrictModel):
    """Instruction records (``reader.chat``): each record is one conversation, rendered
    with ``template`` into the document text; shards then train only the assistant's turns."""

    template: Literal["chatml", "plain"] = Field(
        "chatml", description="How turns are written: chatml (<|im_start|>role ...) or plain."
    )
    messages_key: str = Field(
        "messages", description="Field of a list of {role, content} turns (chat records)."
    )
    prompt_key: str = Field(
        "prompt", description="Or: the field of the user's prompt (prompt/response records)."
    )
    response_key: str = Field("response", description="... and of the assistant's response.")
    system_key: str = Field("system", description="Optional field of a system message.")
    comparisons: bool = Field(
        False,
        description="Records are ranked answers to one prompt (reward-model data): the "
        "prompt (messages_key without the answer, or prompt_key) and answers_key (best "
        "first), or chosen_key and rejected_key.",
    )
    answers_key: str = Field("answers", description="Comparisons: the answers, best first.")
    chosen_key: str = Field("chosen", description="Comparisons: or the preferred answer ...")
    rejected_key: str = Field("rejected", description="... and the other one.")


class BadRecord(ValueError):
    """A record that is not a conversation the template can carry; ``rule`` names why."""

    def __init__(self, rule: str, detail: str) -> None:
        super().__init__(detail)
        self.rule = rule


def record_turns(obj: dict[str, Any], spec: ChatSpec) -> list[tuple[str, str]]:
    """The ``(role, content)`` turns of one record.

    Args:
        obj: the parsed record.
        spec: field names.

    Raises:
        BadRecord: no messages or prompt/response, a malformed turn, an unknown role, or no
            assistant turn to learn from.
    """
    if spec.messages_key in obj:
        raw = obj[spec.messages_key]
        if not isinstance(raw, list) or not raw:
            raise BadRecord("bad_chat", f"{spec.messages_key} is not a non-empty list")
        turns = []
        for i, m in enumerate(raw):
            if not isinstance(m, dict) or not isinstance(m.get("content"), str):
                raise BadRecord("bad_chat", f"turn {i} is not an object with a string content")
            role = m.get("role")
            if role not in ROLES:
                raise BadRecord("bad_chat", f"turn {i} has role {role!r}; use one of {ROLES}")
            turns.append((str(role), m["content"]))
    elif spec.prompt_key in obj or spec.response_key in obj:
        prompt, response = obj.get(spec.prompt_key), obj.get(spec.response_key)
        if not isinstance(prompt, str) or not isinstance(response, str):
            raise BadRecord(
                "bad_chat", f"{spec.prompt_key} and {spec.response_key} must both be strings"
            )
        system = obj.get(spec.system_key)
        turns = [("system", system)] if isinstance(system, str) and system else []
        turns += [("user", prompt), ("assistant", response)]
    else:
        raise BadRecord(
            "bad_chat",
            f"neither {spec.messages_key} nor {spec.prompt_key}/{spec.response_key} is present",
        )
    if not any(r == "assistant" and c.strip() for r, c in turns):
        raise BadRecord("no_response", "no non-empty assistant turn to train on")
    return turns


def render(turns: list[tuple[str, str]], template: Template) -> str:
    """The conversation as one text.

    Raises:
        BadRecord: content holding one of the template's markers (``marker_in_content``).
    """
    out = []
    for role, content in turns:
        for m in template.markers:
            if m.strip() and m in content:
                raise BadRecord("marker_in_content", f"a {role} turn contains {m!r}")
        out.append(template.header(role) + content + template.end)
    return "".join(out)


def generation_prompt(turns: list[tuple[str, str]], template: Template) -> str:
    """``turns`` rendered and followed by the header of the assistant's reply (what a model
    fine-tuned on the template continues)."""
    return render(turns, template) + template.header("assistant")


def split_rendered(text: str, template: Template) -> list[tuple[str, bool]]:
    """Cut a rendered conversation into pieces, each flagged trained or not: an assistant
    turn's content and end marker are trained; headers and other turns are not. Text that
    does not parse (e.g. a filter rewrote a marker) is one untrained piece.

    Args:
        text: the document text as the pipeline left it.
        template: the template it was rendered with.
    """
    headers = [(template.header(r), r) for r in ROLES]
    pattern = "|".join(re.escape(h) for h, _ in headers)
    role_of = dict(headers)
    pieces: list[tuple[str, bool]] = []
    matches = list(re.finditer(pattern, text))
    if not matches or matches[0].start() != 0:
        return [(text, False)]
    for i, m in enumerate(matches):
        role = role_of[m.group(0)]
        last = i + 1 == len(matches)
        stop = len(text) if last else matches[i + 1].start()
        body = text[m.end() : stop]
        if last and not body.endswith(template.end):
            # Normalisation strips the text's trailing whitespace, which ends the last turn's
            # end marker ("\n\n" of plain, the "\n" after chatml's <|im_end|>): put it back,
            # so the last answer teaches the marker like every other turn.
            kept = template.end.rstrip()
            if body.endswith(kept):
                body = body[: len(body) - len(kept)] + template.end
        pieces.append((m.group(0), False))
        pieces.append((body, role == "assistant"))
    return [(t, trained) for t, trained in pieces if t]


def record_comparison(
    obj: dict[str, Any], spec: ChatSpec
) -> tuple[list[tuple[str, str]], list[str]]:
    """The prompt turns and the answers, best first, of one comparison record.

    Raises:
        BadRecord: no prompt, fewer than two distinct string answers (``bad_comparison``).
    """
    if spec.answers_key in obj:
        answers = obj[spec.answers_key]
    elif spec.chosen_key in obj or spec.rejected_key in obj:
        answers = [obj.get(spec.chosen_key), obj.get(spec.rejected_key)]
    else:
        raise BadRecord(
            "bad_comparison",
            f"neither {spec.answers_key} nor {spec.chosen_key}/{spec.rejected_key} is present",
        )
    if not isinstance(answers, list) or not all(isinstance(a, str) and a for a in answers):
        raise BadRecord("bad_comparison", "the answers are not non-empty strings")
    if len(answers) < 2 or len(set(answers)) != len(answers):
        raise BadRecord("bad_comparison", "a comparison needs two or more distinct answers")
    return record_prompt(obj, spec), answers


def record_prompt(obj: dict[str, Any], spec: ChatSpec) -> list[tuple[str, str]]:
    """The turns of a record's prompt: ``messages_key`` (turns up to the answer) or
    ``prompt_key`` (a user turn, after ``system_key``'s message if there is one).

    Raises:
        BadRecord: neither is there, or a turn is malformed (``bad_chat``).
    """
    if spec.messages_key in obj:
        raw = obj[spec.messages_key]
        if not isinstance(raw, list) or not raw:
            raise BadRecord("bad_chat", f"{spec.messages_key} is not a non-empty list")
        answered: dict[str, Any] = {
            spec.messages_key: [*raw, {"role": "assistant", "content": "-"}]
        }
        return record_turns(answered, spec)[:-1]
    if isinstance(obj.get(spec.prompt_key), str):
        answered = {spec.prompt_key: obj[spec.prompt_key], spec.response_key: "-",
                    spec.system_key: obj.get(spec.system_key)}  # fmt: skip
        return record_turns(answered, spec)[:-1]
    raise BadRecord("bad_chat", f"no {spec.messages_key} or {spec.prompt_key} string")


def render_comparison(prompt: list[tuple[str, str]], answers: list[str], template: Template) -> str:
    """One text for a whole comparison: each answer, best first, as a complete conversation
    (the prompt and the answer) opened by the candidate header, so that filters and dedup
    see the group as one document and the shard build keeps it in one row.

    Raises:
        BadRecord: content holding one of the template's markers.
    """
    return "".join(
        template.header(CANDIDATE) + render([*prompt, ("assistant", a)], template) for a in answers
    )


def split_comparison(text: str, template: Template) -> list[str]:
    """The rendered conversations of a comparison text, best first (empty if it does not
    start with a candidate header: a filter rewrote it)."""
    head = template.header(CANDIDATE)
    if not text.startswith(head):
        return []
    return text[len(head) :].split(head)
