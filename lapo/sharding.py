"""FSDP set up for lapo's models: its units, its dtypes, and a CPU mode.

- Weight-decay groups are decided from the module before FSDP wraps it
  (`lapo.optim.decayed_names`), so they are the same under every strategy.
- FSDP units: one per block (IMPALA stage, transformer block, U-Net res block) and one
  per observation encoder. The latent world model's EMA target is a copy of its online
  encoder, updated element by element outside any forward; as units of their own the
  two flatten and shard alike, so each rank updates matching shards.
- Mixed precision under FSDP: parameters and gradient reductions in the low precision,
  buffers in fp32, so the VQ codebook's EMA statistics are never averaged in bf16.
- On a CPU, FSDP runs with gloo (``device_id=cpu``): slow, but it is how it is tested.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn


def fsdp_units() -> set[type[nn.Module]]:
    """Module classes that become FSDP units of their own."""
    from lapo.models.encoders import ImpalaEncoder, ImpalaStage, SpaceTimeBlock, SpaceTimeEncoder
    from lapo.models.fdm import ResBlock

    return {ImpalaStage, SpaceTimeBlock, ResBlock, ImpalaEncoder, SpaceTimeEncoder}


def fsdp_mixed_precision(precision: str) -> Any:
    """Lightning's choice of dtypes for `precision`, except that buffers stay fp32."""
    from torch.distributed.fsdp import MixedPrecision

    low = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    if low is None:
        return None  # 32-true: nothing to cast
    return MixedPrecision(param_dtype=low, reduce_dtype=low, buffer_dtype=torch.float32)


def full_params(model: nn.Module | None) -> Any:
    """Context in which an FSDP `model` holds its whole parameters on every rank (read-only).

    Needed to call a submodule outside a training or validation step (where FSDP gathers
    each unit's shards itself); every rank must enter it. A no-op for any other model.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel

    if isinstance(model, FullyShardedDataParallel):
        return FullyShardedDataParallel.summon_full_params(model, writeback=False)
    return contextlib.nullcontext()


class LapoFSDP(FSDPStrategy):
    """FSDP with lapo's units and dtypes, full (single-file) checkpoints, and a CPU mode."""

    def __init__(self, *, precision: str, cpu: bool) -> None:
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        super().__init__(
            auto_wrap_policy=ModuleWrapPolicy(fsdp_units()),
            mixed_precision=fsdp_mixed_precision(precision),
            # full state dicts keep checkpoints single files (atomic writes, simple resume)
            state_dict_type="full",
            process_group_backend="gloo" if cpu else None,
        )

    def _full_state(self) -> Any:
        """FSDP's full-state-dict mode, gathered to rank zero.

        Lightning "offloads to CPU" always; on a CPU that copy aliases the gathered
        tensors, which FSDP then frees (a segfault at the first save), so not there.
        """
        from torch.distributed.fsdp import FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.api import FullOptimStateDictConfig

        offload = self.root_device.type != "cpu"
        return FSDP.state_dict_type(
            self.model,
            StateDictType.FULL_STATE_DICT,
            FullStateDictConfig(offload_to_cpu=offload, rank0_only=True),
            FullOptimStateDictConfig(offload_to_cpu=offload, rank0_only=True),
        )

    def lightning_module_state_dict(self) -> dict[str, Any]:
        if self.root_device.type != "cpu":
            return super().lightning_module_state_dict()
        with self._full_state():
            return self.model.state_dict()

    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        if self.root_device.type != "cpu":
            return super().optimizer_state(optimizer)
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp import OptimStateKeyType

        optimizer = getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer's own
        with self._full_state():
            state = FSDP.optim_state_dict(self.model, optimizer)
            if self.global_rank == 0:  # keyed by parameter id, as a plain optimizer's
                state = FSDP.rekey_optim_state_dict(state, OptimStateKeyType.PARAM_ID, self.model)
        return state

    def _setup_model(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel

        if self.root_device.type == "cpu" and not isinstance(model, FullyShardedDataParallel):
            # Lightning passes device_id=None on a CPU, which FSDP refuses; wrap here instead
            kwargs = dict(self.kwargs)
            model = FullyShardedDataParallel(
                module=model,
                cpu_offload=self.cpu_offload,
                mixed_precision=self.mixed_precision_config,
                sharding_strategy=self.sharding_strategy,
                device_id=torch.device("cpu"),
                **kwargs,
            )
            self.kwargs.pop("auto_wrap_policy", None)  # applied: Lightning must not warn of it
        return super()._setup_model(model)
