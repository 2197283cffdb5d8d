"""Running one model on many processes (torchrun): the process group, and the one function that applies
activation checkpointing, `torch.compile` and DDP or FSDP2 (`fully_shard`) to a model that knows nothing of
them. Parameter names are left unchanged, so muP parameter groups and checkpoints look the same on 1 or N
processes, and a run resumes on another number of processes.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from crystal_lm.config import TrainConfig
from crystal_lm.model import CrystalModel


def process_micro_batch(batch_size: int, micro_batch_size: int | None, processes: int) -> int:
    """Sequences per process per micro-step: the largest number up to `micro_batch_size` (a memory bound; by
    default the process's whole share) that splits the process's share of the batch evenly. So a run resumes
    on another number of processes with its recipe unchanged. A ValueError says why `processes` cannot split
    the batch (training and `crystal plan` both ask here)."""
    if batch_size % processes:
        raise ValueError(
            f"train.batch_size {batch_size} is not a multiple of {processes} processes (GPUs): each must "
            "compute the same number of sequences"
        )
    share = batch_size // processes
    cap = min(micro_batch_size or share, share)
    return max(m for m in range(1, cap + 1) if share % m == 0)


@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def mean(self, value: float) -> float:
        """The mean of a number over all processes (for logging a loss)."""
        return self.mean_and_any(value, False)[0]

    def mean_and_any(self, value: float, flag: bool) -> tuple[float, bool]:
        """The mean of a number over all processes, and whether any process raised `flag`: one all-reduce,
        so every process decides the same at the same step."""
        if not self.distributed:
            return value, flag
        t = torch.tensor([value, float(flag)], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t[0]) / self.world_size, bool(t[1] > 0)


def init_world() -> World:
    """The process group torchrun describes in the environment (one process without it)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:  # one process: the GPU when there is one
        return World(device="cuda:0" if torch.cuda.is_available() else "cpu")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = f"cuda:{local_rank}", "nccl"
    else:
        device, backend = "cpu", "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return World(rank, world_size, local_rank, device)


def _checkpointed(block: nn.Module, forward, *args, **kwargs):
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def parallelize(model: CrystalModel, cfg: TrainConfig, world: World) -> nn.Module:
    """Activation checkpointing and compile per block, then FSDP2 (blocks, then the root) or DDP.
    Returns the module to call for training; `model` itself stays the module whose parameters the
    optimizer holds (FSDP2 shards them in place)."""
    for block in model.blocks:
        forward = block.forward
        if cfg.compile:
            forward = torch.compile(forward)
        if cfg.activation_checkpointing:
            forward = functools.partial(_checkpointed, block, forward)
        block.forward = forward  # an instance attribute: parameter names do not change
    if not world.distributed:
        return model
    if cfg.parallel == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(world.device.split(":")[0], (world.world_size,))
        # Under bf16 the blocks' weights are gathered in bf16 (half the traffic and memory), but their inputs
        # are not cast: autocast computes as it does without sharding, LayerNorms and the residual stream in
        # fp32. The root (embedding = tied head, final norm) keeps fp32 weights, so the residual stream
        # starts in fp32 too. Results then agree with DDP and one process to bf16 rounding of the blocks'
        # LayerNorm weights, instead of carrying a bf16 residual stream.
        block_policy = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16 if cfg.precision == "bf16" else None,
            reduce_dtype=torch.float32,
            cast_forward_inputs=False,
        )
        for block in model.blocks:
            fully_shard(block, mesh=mesh, mp_policy=block_policy)
        # The root reshards after forward too, so the registered parameters are always the sharded ones (an
        # optimizer made after an evaluation pass must hold those, not the transient unsharded tensors).
        root_policy = MixedPrecisionPolicy(reduce_dtype=torch.float32)
        fully_shard(model, mesh=mesh, mp_policy=root_policy, reshard_after_forward=True)
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [world.local_rank] if world.device.startswith("cuda") else None
    # Gradients live in DDP's all-reduce buckets instead of beside them: 4 bytes per parameter less.
    return DistributedDataParallel(model, device_ids=ids, gradient_as_bucket_view=True)


def _options(world: World):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # Gathered whole on every process (rank 0 writes it): a checkpoint does not depend on the world size.
    return StateDictOptions(full_state_dict=True, cpu_offload=True) if world.distributed else None


def model_state(model: nn.Module, world: World) -> dict[str, torch.Tensor]:
    """The full model state under its own parameter names (a collective under FSDP2)."""
    if not world.distributed:
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options(world))


def load_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, world: World
) -> None:
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, optim_state_dict=state, options=_options(world))


# Dense bf16 peak TFLOP/s (no sparsity) by device name, for MFU. The most specific name that the device's
# name contains wins: an "H100 PCIe" is not an SXM H100.
PEAK_TFLOPS = {
    "H100": 989.0,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H200": 989.0,
    "H200 NVL": 835.0,
    "H800": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "A10": 125.0,
}


def peak_tflops(configured: float | None, device: str) -> float | None:
    if configured is not None:
        return configured
    if device.startswith("cuda"):
        return peak_tflops_of(torch.cuda.get_device_name(torch.device(device)))
    return None


def peak_tflops_of(device_name: str) -> float | None:
    known = [k for k in PEAK_TFLOPS if k in device_name]
    return PEAK_TFLOPS[max(known, key=len)] if known else None


def flops_per_token(n_params: int, n_layers: int, n_heads: int, head_dim: int, seq_len: int) -> int:
    """Training FLOPs per token: 6·N for the matmuls of forward and backward, plus 12·L·H·Q·T for
    attention scores and values (the PaLM appendix convention)."""
    return 6 * n_params + 12 * n_layers * n_heads * head_dim * seq_len


@contextlib.contextmanager
def single_process_dcp() -> Iterator[None]:
    """torch.distributed.checkpoint warns at every save and load without a process group that it assumes a
    single process: that is the intent here, so the warning is silenced (only then, and only that one).

    It also wraps a Ctrl-C that lands inside its reads or writes in a CheckpointException (with a traceback
    per rank); it is raised again as the KeyboardInterrupt it is, so the run stops as at any other moment."""
    from torch.distributed.checkpoint.api import CheckpointException

    with warnings.catch_warnings():
        if not (dist.is_available() and dist.is_initialized()):
            warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        try:
            yield
        except CheckpointException as exc:
            if any(isinstance(failure[0], KeyboardInterrupt) for failure in exc.failures.values()):
                raise KeyboardInterrupt from None
            raise


def save_optimizer_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, path) -> None:
    """Every process writes its shard of the optimizer state with torch.distributed.checkpoint (one process:
    the whole of it). Keys are parameter names, so it loads on any number of processes."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    with single_process_dcp():
        dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=str(path))


def load_optimizer_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, path) -> None:
    """Load a sharded optimizer state into a live optimizer, resharding to this world's layout."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    state = {"optimizer": get_optimizer_state_dict(model, optimizer)}  # a template with this layout
    with single_process_dcp():
        dcp.load(state, checkpoint_id=str(path))
    set_optimizer_state_dict(model, optimizer, optim_state_dict=state["optimizer"])
