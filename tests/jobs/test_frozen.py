"""The frozen reward model partitioned by ZeRO-3 scores each rank's own answers in lock step:
a rank with fewer scorable answers runs as many forward passes as the rank with the most,
since each pass of a partitioned model is a collective (its parameters are gathered)."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch


class _GatheringModel(torch.nn.Module):
    """Stands in for a ZeRO-3 reward model: every forward is a collective (an all-reduce, as
    a parameter gather is) and is counted."""

    def __init__(self) -> None:
        super().__init__()
        self.passes = 0

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, None]:
        import torch.distributed as dist

        self.passes += 1
        dist.all_reduce(torch.ones(1))
        return torch.full(tokens.shape, float(tokens.shape[1])), None


def _rank_main(rank: int, init: str, tokenizer: str, out: str) -> None:
    import torch.distributed as dist

    from crucible.data_pipeline.chat import TEMPLATES
    from crucible.data_pipeline.shards.pack_task import text_specials
    from crucible.data_pipeline.tokens.tokenizer import load_tokenizer
    from crucible.jobs.rlhf.rejection import RewardScorer

    # a mismatch of passes fails within the timeout instead of hanging the suite
    dist.init_process_group(
        "gloo", init_method=init, rank=rank, world_size=2, timeout=timedelta(seconds=60)
    )
    scorer = RewardScorer.__new__(RewardScorer)
    tok = load_tokenizer(Path(tokenizer))
    scorer.tok, scorer.eos = text_specials(tok), tok.token_to_id("<|endoftext|>")
    scorer.template, scorer.context, scorer.device = TEMPLATES["plain"], 128, "cpu"
    scorer.model, scorer.batch_size, scorer.lockstep = _GatheringModel(), 1, True
    prompt = [("user", "reverse: the of and")]
    if rank == 0:  # three scorable answers: three passes of one
        pairs = [(prompt, "and of the"), (prompt, "and of"), (prompt, "and")]
    else:  # one answer with a template marker (unscorable), none to score
        pairs = [(prompt, "### user:\nand")]
    scores = scorer.score(pairs)
    Path(out, f"rank-{rank}.json").write_text(
        json.dumps({"passes": scorer.model.passes, "scores": scores})
    )
    dist.destroy_process_group()


def test_every_rank_runs_as_many_reward_passes_as_the_busiest(
    tmp_path: Path, train_shards: Path
) -> None:
    import torch.multiprocessing as mp

    init = f"file://{tmp_path / 'store'}"
    tok = str(train_shards / "tokenizer.json")
    mp.spawn(_rank_main, args=(init, tok, str(tmp_path)), nprocs=2, join=True)
    got: list[dict[str, Any]] = [
        json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)
    ]
    assert got[0]["passes"] == got[1]["passes"] == 3
    assert got[1]["scores"] == [float("-inf")]
    # each score is read at its own conversation's last token: longer answers, later
    assert got[0]["scores"][0] > got[0]["scores"][1] > got[0]["scores"][2] > 0
