"""Sharded training (FSDP2) on CPU gloo processes: exact gradients, sharded checkpoints, resharding, memory."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from gloo import gloo_group
from test_train import demo_overrides, run_cli  # noqa: F401 (demo_overrides is a fixture)

from clip_pl.distributed import free_port
from clip_pl.loss import ClipLoss
from clip_pl.model import CLIP, create_model
from clip_pl.model_files.checkpoint import read_checkpoint

pytestmark = pytest.mark.skipif(
    not hasattr(torch.distributed, "fsdp") or not hasattr(torch.distributed.fsdp, "fully_shard"),
    reason="FSDP2 (fully_shard) needs torch>=2.6",
)

GLOBAL_BATCH = 8
TOLERANCE = 1e-5


def small_model(seed: int = 0, grad_checkpointing: bool = False) -> CLIP:
    torch.manual_seed(seed)
    return create_model(
        "tiny",
        image={
            "image_size": 32,
            "model_kwargs": {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2},
            "grad_checkpointing": grad_checkpointing,
        },
        text={
            "vocab_size": 64, "context_length": 8, "width": 32, "heads": 2, "layers": 2,
            "grad_checkpointing": grad_checkpointing,
        },
        embed_dim=16,
    )


def global_batch(step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    images = torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=g)
    tokens = torch.randint(3, 64, (GLOBAL_BATCH, 8), generator=g)
    tokens[:, -1] = 2  # an EOS in every caption
    return images, tokens


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered, a plain tensor (the replicated temperature) copied."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor.detach().clone()


def reference_gradients(out_dir: str) -> None:
    """The single-process loss and gradients of the global batch."""
    model = small_model()
    loss = ClipLoss()(*model(*global_batch()))
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    torch.save({"loss": loss.detach(), "grads": grads}, os.path.join(out_dir, "reference.pt"))


def _sharded_gradients(
    rank: int, world_size: int, port: int, out_dir: str, unsynced_block: bool, micro_batch_size: int | None,
    grad_checkpointing: bool,
) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    from clip_pl.training.fsdp import held_bytes, shard_model
    from clip_pl.training.module import forward_in_micro_batches

    with gloo_group(rank, world_size, port):
        model = shard_model(small_model(0, grad_checkpointing), init_device_mesh("cpu", (world_size,))).train()
        assert model.image_tower.trunk.grad_checkpointing == grad_checkpointing
        if unsynced_block:
            # One block's gradients are no longer reduce-scattered: each rank keeps its own.
            model.image_tower.trunk.blocks[1].set_requires_gradient_sync(False)
        images, tokens = (t.chunk(world_size)[rank] for t in global_batch())
        loss = ClipLoss()(*forward_in_micro_batches(model, images, tokens, micro_batch_size))
        loss.backward()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        grads = {name: None if p.grad is None else whole(p.grad) for name, p in model.named_parameters()}
        params = {name: whole(p).detach() for name, p in model.named_parameters()}
        optimizer = torch.optim.AdamW(model.parameters())
        optimizer.step()
        most_bytes = torch.tensor(held_bytes(model, optimizer))
        dist.all_reduce(most_bytes, op=dist.ReduceOp.MAX)
        if rank == 0:
            torch.save(
                {"loss": mean_loss / world_size, "grads": grads, "params": params, "bytes": int(most_bytes)},
                os.path.join(out_dir, "sharded.pt"),
            )


def sharded_gradients(
    tmp_path, world_size: int, unsynced_block: bool = False, micro_batch_size: int | None = None,
    grad_checkpointing: bool = False,
) -> dict:
    args = (world_size, free_port(), str(tmp_path), unsynced_block, micro_batch_size, grad_checkpointing)
    torch.multiprocessing.spawn(_sharded_gradients, args=args, nprocs=world_size)
    return torch.load(tmp_path / "sharded.pt")


# With 2 ranks every block's activations are recomputed in backward (the towers' grad_checkpointing);
# with 4 each rank encodes its 2 samples one at a time, recomputed in backward (module.micro_batch_size).
@pytest.mark.parametrize("world_size, micro_batch_size, grad_checkpointing", [(2, None, True), (4, 1, False)])
def test_fsdp_gradients_equal_the_single_process_global_batch_and_memory_falls(
    tmp_path, world_size, micro_batch_size, grad_checkpointing
):
    reference_gradients(str(tmp_path))
    reference = torch.load(tmp_path / "reference.pt")
    sharded = sharded_gradients(tmp_path, world_size, micro_batch_size=micro_batch_size,
                                grad_checkpointing=grad_checkpointing)
    # Weights, gradients and AdamW's two moments: 16 bytes per parameter in one process; each rank
    # holds its 1/W of them (rows are split in equal chunks, the last ones padded or empty).
    model = small_model()
    whole_bytes = 16 * sum(p.numel() for p in model.parameters())
    assert whole_bytes / world_size <= sharded["bytes"] <= 1.15 * whole_bytes / world_size
    # Sharding keeps the weights: every rank started from the same model.
    for name, param in small_model().named_parameters():
        torch.testing.assert_close(sharded["params"][name], param.detach(), rtol=0, atol=0)
    torch.testing.assert_close(sharded["loss"], reference["loss"], rtol=0, atol=TOLERANCE)
    assert sharded["grads"].keys() == reference["grads"].keys()
    for name, grad in reference["grads"].items():
        torch.testing.assert_close(sharded["grads"][name], grad, rtol=0, atol=TOLERANCE, msg=name)


def test_the_gradient_check_fails_when_a_block_leaves_the_reduction(tmp_path):
    reference_gradients(str(tmp_path))
    reference = torch.load(tmp_path / "reference.pt")["grads"]
    sharded = sharded_gradients(tmp_path, 2, unsynced_block=True)["grads"]
    # Without the reduce-scatter the block's sharded parameters receive no gradient at all.
    wrong = [n for n, g in reference.items() if sharded[n] is None or not torch.allclose(sharded[n], g, atol=TOLERANCE)]
    assert wrong and all(name.startswith("image_tower.trunk.blocks.1.") for name in wrong)


class Holder(torch.nn.Module):
    """Stands for the LightningModule: the model under ``model.``, as in training checkpoints."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.model = small_model(seed)


def _step(holder: Holder, optimizer: torch.optim.Optimizer, step: int, rank: int, world_size: int) -> None:
    images, tokens = (t.chunk(world_size)[rank] for t in global_batch(step))
    ClipLoss()(*holder.model(images, tokens)).backward()
    optimizer.step()
    optimizer.zero_grad()


def _whole_state(holder: Holder, optimizer: torch.optim.Optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True)
    state = {
        "weights": get_model_state_dict(holder, options=options),
        "optimizer": get_optimizer_state_dict(holder, optimizer, options=options)["state"],
    }
    # Copies: the replicated temperature comes back as the live tensor itself.
    return torch.utils._pytree.tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, state)


def _sharded_run(rank: int, world_size: int, port: int, out_dir: str, phase: str) -> None:
    """One phase of the checkpoint tests on ``world_size`` gloo ranks (see the tests below)."""
    from lightning.fabric.strategies.model_parallel import _load_checkpoint
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    from torch.distributed.device_mesh import init_device_mesh

    from clip_pl.model_files.checkpoint import ShardedCheckpointIO
    from clip_pl.training.fsdp import shard_model

    path = os.path.join(out_dir, "checkpoints", "last.ckpt")
    with gloo_group(rank, world_size, port):
        holder = Holder(seed=0 if phase == "save" else 1)  # resumed runs start from other weights
        shard_model(holder.model, init_device_mesh("cpu", (world_size,)))
        # eps as training's default: a smaller one turns float noise in the key biases' zero gradient
        # into full-size steps, different for each summation order.
        optimizer = torch.optim.AdamW(holder.parameters(), lr=1e-2, betas=(0.9, 0.98), eps=1e-6)
        io = ShardedCheckpointIO(async_save=True)
        if phase == "save":
            _step(holder, optimizer, 0, rank, world_size)
            checkpoint = {
                "state_dict": get_model_state_dict(holder),
                "optimizer_states": [get_optimizer_state_dict(holder, optimizer)],
                "global_step": 1,
            }
            io.save_checkpoint(checkpoint, path)
            saved = _whole_state(holder, optimizer)
            _step(holder, optimizer, 1, rank, world_size)  # while the checkpoint is written
            io.teardown()
        else:
            state = {"state_dict": holder, "optimizer_0": optimizer}
            _load_checkpoint(Path(path), state, optimizer_states_from_list=True)
            saved = _whole_state(holder, optimizer)
            if phase == "killed":
                # Killed while writing the next checkpoint: every rank's shards written, not committed.
                io._commit = lambda *args: os._exit(0)
                io.save_checkpoint({**checkpoint_at(holder, optimizer), "global_step": 2}, path)
                io.wait()
            _step(holder, optimizer, 1, rank, world_size)
            if world_size == 4:
                io.save_checkpoint({**checkpoint_at(holder, optimizer), "global_step": 2}, path)
                io.teardown()
        after = _whole_state(holder, optimizer)
        if rank == 0:
            torch.save({"saved": saved, "after": after}, os.path.join(out_dir, f"{phase}-{world_size}.pt"))


def checkpoint_at(holder: Holder, optimizer: torch.optim.Optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return {
        "state_dict": get_model_state_dict(holder),
        "optimizer_states": [get_optimizer_state_dict(holder, optimizer)],
    }


def run_phase(tmp_path, phase: str, world_size: int) -> dict:
    torch.multiprocessing.spawn(_sharded_run, args=(world_size, free_port(), str(tmp_path), phase), nprocs=world_size)
    return torch.load(tmp_path / f"{phase}-{world_size}.pt")


def without_key_biases(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """The query and value thirds of an attention's input bias, anything else whole.

    Softmax ignores a constant added to every score of a query, so the key bias gets a zero
    gradient; AdamW divides its float noise (which depends on the summation order, and so on the
    number of ranks) by the noise's own size, a step of any size up to the learning rate.
    """
    if "attn.qkv.bias" not in name or tensor.ndim != 1:
        return tensor
    q, _, v = tensor.chunk(3)
    return torch.cat([q, v])


def assert_states_close(actual: dict, expected: dict, tolerance: float = TOLERANCE) -> None:
    flat = lambda d, prefix="": (  # noqa: E731
        {k: v for key, value in d.items() for k, v in flat(value, f"{prefix}{key}.").items()}
        if isinstance(d, dict) else {prefix: d}
    )
    actual, expected = flat(actual), flat(expected)
    assert actual.keys() == expected.keys()
    differences = {
        key: (without_key_biases(key, actual[key]) - without_key_biases(key, value)).abs().max().item()
        for key, value in expected.items()
    }
    assert max(differences.values()) <= tolerance, sorted(differences.items(), key=lambda kv: -kv[1])[:3]


def test_a_sharded_checkpoint_survives_a_kill_and_resumes_on_other_world_sizes_as_an_uninterrupted_run(tmp_path):
    from clip_pl.model_files.checkpoint import checkpoint_step

    uninterrupted = run_phase(tmp_path, "save", 2)
    checkpoints = tmp_path / "checkpoints"
    assert (checkpoints / "last.ckpt").is_symlink()
    assert os.listdir(checkpoints / "last.ckpt.shards") == ["step-000000001"]

    # Killed after writing the shards of step 2, before committing them: last.ckpt is still step 1.
    torch.multiprocessing.spawn(_sharded_run, args=(2, free_port(), str(tmp_path), "killed"), nprocs=2)
    assert sorted(os.listdir(checkpoints / "last.ckpt.shards")) == ["step-000000001", "step-000000002.partial"]
    assert checkpoint_step(checkpoints / "last.ckpt") == 1
    assert_states_close(read_checkpoint(checkpoints / "last.ckpt")["state_dict"], uninterrupted["saved"]["weights"])

    for world_size in (1, 4):
        resumed = run_phase(tmp_path, "resume", world_size)
        # The weights and AdamW's moments of step 1, resharded from 2 ranks to 1 and to 4...
        assert_states_close(resumed["saved"], uninterrupted["saved"])
        # ...and the next step equals the uninterrupted run's.
        assert_states_close(resumed["after"], uninterrupted["after"])
    # The resumed run's save (step 2) replaced the partial folder and the old checkpoint.
    assert os.listdir(checkpoints / "last.ckpt.shards") == ["step-000000002"]
    assert checkpoint_step(checkpoints / "last.ckpt") == 2


FSDP_ON_CPU = ["trainer=fsdp", "trainer.accelerator=cpu", "trainer.precision=32-true"]


def train_losses(run_dir) -> list[float]:
    (metrics,) = run_dir.rglob("metrics.csv")
    return [float(row["train/loss"]) for row in csv.DictReader(open(metrics)) if row.get("train/loss")]


def test_trainer_fsdp_trains_as_ddp_and_resumes_without_it_and_the_other_way_round(demo_overrides, tmp_path):
    from clip_pl.model_files.load import load_model

    # The demo's one validation shard leaves rank 1 without validation batches: sharded evaluation
    # must not wait for it.
    common = [*demo_overrides, "trainer.devices=2", "trainer.max_steps=4", "trainer.log_every_n_steps=1"]
    runs = {"fsdp": [*common, *FSDP_ON_CPU], "ddp": [*common, "trainer.strategy=ddp"]}
    for name, overrides in runs.items():
        result = run_cli([*overrides, f"run_dir={tmp_path / name}"], timeout=400)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "zero_shot/demo_shape/top1" in result.stdout + result.stderr
    # Same losses at every step, same weights after the last (gradient clipping at 1.0 included).
    torch.testing.assert_close(train_losses(tmp_path / "fsdp"), train_losses(tmp_path / "ddp"), rtol=0, atol=1e-5)
    sharded_path = tmp_path / "fsdp" / "checkpoints" / "last.ckpt"
    assert sharded_path.is_symlink()
    sharded = read_checkpoint(sharded_path)["state_dict"]
    whole = read_checkpoint(tmp_path / "ddp" / "checkpoints" / "last.ckpt")["state_dict"]
    assert_states_close(sharded, whole, tolerance=1e-4)

    # The sharded checkpoint exports (and loads) like any other.
    exported = tmp_path / "model.safetensors"
    assert subprocess.run([sys.executable, "-m", "clip_pl.export", str(sharded_path), str(exported)]).returncode == 0
    for path in (exported, sharded_path):
        model, _ = load_model(path)
        for name, tensor in model.state_dict().items():
            torch.testing.assert_close(tensor, sharded["model." + name], rtol=0, atol=0)

    # Resumed without FSDP on one process, and a DDP run resumed under FSDP.
    for name, overrides in (("fsdp", []), ("ddp", FSDP_ON_CPU)):
        result = run_cli([*demo_overrides, *overrides, "trainer.max_steps=5", f"run_dir={tmp_path / name}"])
        assert result.returncode == 0, result.stderr[-3000:]
        checkpoint = tmp_path / name / "checkpoints" / "last.ckpt"
        assert read_checkpoint(checkpoint)["global_step"] == 5
        assert checkpoint.is_symlink() == (name == "ddp")
        assert os.path.exists(str(checkpoint) + ".shards") == (name == "ddp")


def test_trainer_fsdp_refuses_compile_in_one_line(demo_overrides, tmp_path):
    result = run_cli([*demo_overrides, *FSDP_ON_CPU, "module.compile=true", f"run_dir={tmp_path}"])
    assert result.returncode == 2, result.stderr[-3000:]
    line = "error: trainer=fsdp does not compile the model yet: set module.compile=false"
    assert result.stderr.strip().splitlines()[-1] == line
