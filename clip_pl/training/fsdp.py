"""Sharded data parallelism (FSDP2) for models larger than DDP can hold: ``trainer=fsdp``.

DDP keeps the whole model, its gradients and AdamW's two moments on every GPU, about 16 bytes per
parameter. Here each rank holds 1/W of them: PyTorch's ``fully_shard`` shards every block of both
towers, then the rest of the model; a block's weights are gathered just before its forward (and its
backward) and freed after, and its gradients are reduce-scattered as soon as they are computed.
The contrastive loss is unchanged: it gathers features across ranks, not weights.

The strategy is Lightning's ``ModelParallelStrategy`` with a one-dimensional mesh (every rank is a
data-parallel rank) and clip_pl's sharded checkpoints (``clip_pl.model_files.checkpoint.ShardedCheckpointIO``):
every rank writes its shards, in the background, and ``last.ckpt`` is switched to the new
checkpoint only once every rank's shards are on disk. A sharded checkpoint resumes on any number of
ranks (torch.distributed.checkpoint reshards the weights and the optimizer state), also without
FSDP, and a DDP checkpoint resumes under FSDP.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from clip_pl.model import CLIP
from clip_pl.model_files.checkpoint import (
    ShardedCheckpointIO,
    is_sharded_checkpoint,
    optimizer_state_by_name,
    read_checkpoint,
)

# Trainer precisions the strategy maps onto FSDP2's mixed precision: compute dtype of the weights.
PARAM_DTYPES = {"32-true": None, "bf16-mixed": torch.bfloat16}


def image_blocks(trunk: nn.Module) -> list[nn.Module]:
    """The image trunk's units of sharding: a ViT's blocks, a ConvNeXt's stages, a ResNet's layers.

    A trunk with none of these is sharded as one unit.
    """
    if isinstance(getattr(trunk, "blocks", None), (nn.Sequential, nn.ModuleList)):
        return list(trunk.blocks)
    if isinstance(getattr(trunk, "stages", None), (nn.Sequential, nn.ModuleList)):
        return list(trunk.stages)
    layers = [getattr(trunk, f"layer{i}", None) for i in range(1, 5)]
    return [layer for layer in layers if isinstance(layer, nn.Module)] or [trunk]


def shard_model(model: CLIP, mesh: Any, param_dtype: torch.dtype | None = None) -> CLIP:
    """Shards ``model`` in place with ``fully_shard``: each block of both towers, then the root.

    Args:
        model: The CLIP model, on its device.
        mesh: A one-dimensional ``DeviceMesh`` of the data-parallel ranks.
        param_dtype: The dtype the gathered weights are computed in (``torch.bfloat16``); the
            sharded weights, the optimizer and the gradient reduction stay in float32. None: float32.

    Returns:
        ``model``, whose parameters are now ``DTensor`` shards.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in image_blocks(model.image_tower.trunk) + list(model.text_tower.blocks):
        fully_shard(block, mesh=mesh, mp_policy=policy)
    # fully_shard cannot shard a 0-d parameter (the temperature, SigLIP's bias). They stay whole on
    # every rank, in float32, and their gradients are averaged here, as DDP would.
    scalars = {p for p in model.parameters() if p.ndim == 0}
    group, world_size = mesh.get_group(), mesh.size()
    for param in scalars:
        param.register_hook(lambda grad: _averaged(grad, group, world_size))
    # Not registered as forward methods: forward calls both, and FSDP would then reshard the root
    # after every forward. Evaluation calls them with the whole model gathered (hold_gathered).
    fully_shard(model, mesh=mesh, mp_policy=policy, ignored_params=scalars)
    return model


def _averaged(grad: torch.Tensor, group: Any, world_size: int) -> torch.Tensor:
    grad = grad / world_size
    torch.distributed.all_reduce(grad, group=group)
    return grad


def held_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes this rank holds of ``model``'s weights, their gradients and the optimizer state.

    Counts a sharded tensor's local shard, so under ``shard_model`` it falls as 1/W.
    """
    def local(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to_local() if hasattr(tensor, "to_local") else tensor

    tensors = list(model.parameters()) + [p.grad for p in model.parameters() if p.grad is not None]
    tensors += [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    return sum(local(t).numel() * local(t).element_size() for t in tensors)


def hold_gathered(model: CLIP, hold: bool) -> None:
    """Keeps the whole of a sharded ``model`` gathered on every rank (True) or shards it again (False).

    For evaluation: a sharded forward is a collective, but ranks evaluate different numbers of
    batches (possibly none), so validation gathers the weights once and runs without collectives,
    as DDP's does. Costs the model's weights, in the compute dtype, for the duration.
    """
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            # The root keeps FSDP's default: gathered from its forward to the backward that follows.
            module.set_reshard_after_forward(not hold and module is not model, recurse=False)
            if hold:
                module.unshard()
            else:
                module.reshard()


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` as pure sharded data parallelism of a ``CLIPModule``.

    Every rank is a data-parallel rank (no tensor parallelism); ``CLIPModule.model`` is sharded by
    ``shard_model`` when the trainer sets up. Checkpoints are sharded (``ShardedCheckpointIO``).

    Args:
        async_save: Write checkpoints in a background thread; training waits only while the shards
            are copied to host memory.
        **kwargs: ``ModelParallelStrategy``'s ``process_group_backend`` and ``timeout``.
    """

    def __init__(self, async_save: bool = True, **kwargs: Any) -> None:
        super().__init__(save_distributed_checkpoint=True, **kwargs)
        self._sharded_io = ShardedCheckpointIO(async_save=async_save)

    @property
    def checkpoint_io(self) -> ShardedCheckpointIO:
        return self._sharded_io

    @checkpoint_io.setter
    def checkpoint_io(self, io: Any) -> None:
        # The trainer's checkpoint IO plugin writes whole files from rank 0; shards are written here.
        pass

    def setup_environment(self) -> None:
        # One mesh dimension: all ranks shard the model among themselves (Lightning's "auto" would
        # make the GPUs of a node a tensor-parallel group).
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()

    def setup(self, trainer: Any) -> None:
        module = self.lightning_module
        precision = str(trainer.precision)
        if precision not in PARAM_DTYPES:
            raise ValueError(
                f"trainer=fsdp trains in trainer.precision bf16-mixed (bf16 compute, float32 weights) or 32-true, "
                f"not {precision}"
            )
        if getattr(module, "compile", False):
            raise ValueError("trainer=fsdp does not compile the model yet: set module.compile=false")
        if not is_sharded(module.model):
            shard_model(module.model, self.device_mesh["data_parallel"], PARAM_DTYPES[precision])
        super().setup(trainer)

    def on_validation_start(self) -> None:
        super().on_validation_start()
        hold_gathered(self.lightning_module.model, True)

    def on_validation_end(self) -> None:
        hold_gathered(self.lightning_module.model, False)
        super().on_validation_end()

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        self._sharded_io.save_checkpoint(checkpoint, self.broadcast(str(filepath)))

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        self._sharded_io.wait()
        path = self.broadcast(str(checkpoint_path))
        if is_sharded_checkpoint(path):
            return super().load_checkpoint(path, weights_only=weights_only)
        # A whole checkpoint (DDP's): every rank reads the file and keeps its shards. Lightning 2.6.6's
        # own path loads it parameter by parameter with broadcast_from_rank0
        # (https://github.com/Lightning-AI/pytorch-lightning/pull/19870) and failed here with a size
        # mismatch on the patch embedding's weight; loading the whole state dict at once does not.
        checkpoint = read_checkpoint(path)
        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(self.model, checkpoint.pop("state_dict"), options=options)
        names = {param: name for name, param in self.model.named_parameters()}
        for optimizer, state in zip(self.optimizers, checkpoint.pop("optimizer_states")):
            order = [names[param] for group in optimizer.param_groups for param in group["params"]]
            state = optimizer_state_by_name(state, order)
            set_optimizer_state_dict(self.model, optimizer, state, options=options)
        return checkpoint

    def teardown(self) -> None:
        self._sharded_io.teardown()
        super().teardown()
