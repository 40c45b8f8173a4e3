"""The callback contract of the training loop (in the style of OLMo-core's ``Callback``), the
state callbacks see, and what the loop hands them."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from crucible.cluster.plan import RunPlan
from crucible.cluster.storage import Location
from crucible.jobs.spec import TrainRunSpec
from crucible.jobs.train.checkpoint import SaveStats

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

    from crucible.data_pipeline.training_reader import TrainingReader
    from crucible.jobs.train.launcher import Launcher


@dataclass
class StepResult:
    """One optimizer step, as the loop measured it; callbacks add what they compute."""

    step: int
    """Steps done after this one."""
    loss: float
    lr: float
    grad_norm: float
    tokens: int
    """Tokens in the global batch."""
    samples: int
    """Sequences in the global batch."""
    started: float
    """Unix time the step began (its batch read included)."""
    seconds: float
    """Its duration, on a monotonic clock."""
    data_wait_seconds: float
    engine_seconds: float
    """The part spent in the engine's forward, backward and step."""
    checkpoint_wait_seconds: float = 0.0
    """The part of that spent waiting, before the optimizer step, for the asynchronous save
    in flight to finish copying the state to host memory."""
    mfu: float | None = None
    """Model FLOPs utilisation (set by the metrics callback on rank 0)."""
    heldout_loss: float | None = None
    """Held-out loss (set by the evaluator on evaluation steps)."""
    heldout_accuracy: float | None = None
    """A reward model's held-out accuracy: the share of answer pairs ordered right."""
    heldout_exact_match: float | None = None
    """Greedy exact match of ``train.eval_prompts`` (set on evaluation steps when given)."""

    def scores(self) -> dict[str, float]:
        """The evaluation's scores besides the loss, by name (``accuracy``, ``exact_match``)."""
        out = {"accuracy": self.heldout_accuracy, "exact_match": self.heldout_exact_match}
        return {k: v for k, v in out.items() if v is not None}

    def record(self) -> dict[str, Any]:
        """The step's record in ``metrics.jsonl`` (without its kind and time)."""
        out: dict[str, Any] = {
            "step": self.step,
            "loss": self.loss,
            "lr": self.lr,
            "grad_norm": self.grad_norm,
            "tokens": self.tokens,
            "step_seconds": self.seconds,
            "data_wait_seconds": self.data_wait_seconds,
            "engine_seconds": self.engine_seconds,
            "checkpoint_wait_seconds": self.checkpoint_wait_seconds,
            "tokens_per_s": self.tokens / self.seconds,
            "mfu": self.mfu,
        }
        if self.heldout_loss is not None:
            out["heldout_loss"] = self.heldout_loss
        for name, value in self.scores().items():
            out[f"heldout_{name}"] = value
        return out

    def scalars(self) -> dict[str, float]:
        """The step's scalars as loggers tag them (``train/*``, ``eval/heldout_loss``)."""
        out = {
            "train/loss": self.loss,
            "train/lr": self.lr,
            "train/grad_norm": self.grad_norm,
            "train/tokens_per_s": self.tokens / self.seconds,
            "train/step_seconds": self.seconds,
            "train/data_wait_seconds": self.data_wait_seconds,
        }
        if self.mfu is not None:
            out["train/mfu"] = self.mfu
        if self.heldout_loss is not None:
            out["eval/heldout_loss"] = self.heldout_loss
        for name, value in self.scores().items():
            out[f"eval/heldout_{name}"] = value
        return out


@dataclass(frozen=True)
class Resumed:
    """The checkpoint an attempt resumed from."""

    step: int
    path: Location
    world_size: int
    """Ranks that wrote it."""
    seconds: float
    """Load and restore time."""
    bytes: int


C = TypeVar("C", bound="Callback")


class Callback:
    """One cross-cutting concern of the loop; every hook does nothing unless overridden.

    Hooks run on every rank in the order the callbacks were built (see
    :func:`.build_callbacks`), ``on_end`` in the reverse order; a callback that only rank 0
    needs checks ``rank`` itself.
    """

    def on_resume(self, resumed: Resumed) -> None:
        """A checkpoint was loaded (before the first step of the attempt)."""

    def on_start(self) -> None:
        """Start-up is over: the first step of the attempt begins now."""

    def on_step_end(self, result: StepResult) -> None:
        """An optimizer step finished."""

    def on_eval(
        self, loss: float, t0: float, t1: float, scores: dict[str, float] | None = None
    ) -> None:
        """A held-out evaluation ran from ``t0`` to ``t1`` (unix seconds); ``scores`` are its
        other results by name (a reward model's ``accuracy``, ``exact_match`` on prompts)."""

    def on_save(self, stats: SaveStats, t0: float) -> None:
        """A checkpoint was committed; its save began at ``t0`` (unix seconds), and the loop
        waited for it during ``stats.blocked_spans``."""

    def on_end(self, status: str) -> None:
        """The attempt is over: ``finished`` or ``failed``."""


class Callbacks(Callback):
    """Callbacks called in order, as one."""

    def __init__(self, items: Iterable[Callback] = ()) -> None:
        self.items = list(items)

    def find(self, kind: type[C]) -> C:
        """The callback of type ``kind`` (the loop calls one of them directly)."""
        return next(cb for cb in self.items if isinstance(cb, kind))

    def on_resume(self, resumed: Resumed) -> None:
        for cb in self.items:
            cb.on_resume(resumed)

    def on_start(self) -> None:
        for cb in self.items:
            cb.on_start()

    def on_step_end(self, result: StepResult) -> None:
        for cb in self.items:
            cb.on_step_end(result)

    def on_eval(
        self, loss: float, t0: float, t1: float, scores: dict[str, float] | None = None
    ) -> None:
        for cb in self.items:
            cb.on_eval(loss, t0, t1, scores)

    def on_save(self, stats: SaveStats, t0: float) -> None:
        for cb in self.items:
            cb.on_save(stats, t0)

    def on_end(self, status: str) -> None:
        # In reverse: a callback ends while those built before it, which it may still tell of
        # something (the checkpointer of a save a failure left in flight), are open.
        for cb in reversed(self.items):
            cb.on_end(status)


@dataclass
class TrainContext:
    """What the loop and its callbacks share on one rank."""

    spec: TrainRunSpec
    plan: RunPlan
    run_dir: Location
    rank: int
    world: int
    use_gpu: bool
    reader: TrainingReader
    engine: DeepSpeedEngine = None
    """Set once built (after the callbacks: they start before the model is built)."""
    step: int = 0
    """Optimizer steps done."""
    callbacks: Callbacks = field(default_factory=Callbacks)
    stop_requested: bool = False
    """A graceful stop was asked for: the loop ends after the current step."""
    stop_checkpoint: bool = True
    """... with a checkpoint of that step."""
    launcher: Launcher | None = None
    """Who started the rank (Ray Train or torchrun); None in tests that drive callbacks."""

    @property
    def checkpoints(self) -> Location:
        """The run's checkpoints directory."""
        return self.run_dir / "checkpoints"
