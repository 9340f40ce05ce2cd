"""clip_pl.distributed.DeferredSum across real gloo processes."""

import json
import os

import torch
from gloo import gloo_group

from clip_pl.distributed import DeferredSum, free_port


def _rank_main(rank, world_size, port, out_dir):
    with gloo_group(rank, world_size, port):
        votes, seen = DeferredSum(), []
        seen.append(votes.read())  # nothing started yet
        votes.start(rank + 1, torch.device("cpu"))
        seen.append(votes.read())
        seen.append(votes.read())  # read clears it
        votes.start(100, torch.device("cpu"))
        votes.start(int(rank == 2), torch.device("cpu"))  # replaces the pending sum
        seen.append(votes.read())
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(seen, f)


def test_deferred_sum_is_the_same_sum_on_every_rank(tmp_path):
    torch.multiprocessing.spawn(_rank_main, args=(3, free_port(), str(tmp_path)), nprocs=3)
    for rank in range(3):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == [0, 1 + 2 + 3, 0, 1]


def test_deferred_sum_in_one_process_is_the_value():
    votes = DeferredSum()
    votes.start(7, torch.device("cpu"))
    assert votes.read() == 7
