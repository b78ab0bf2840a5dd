"""Numerical faults: a NaN/inf loss or gradient never reaches the weights or a checkpoint.

Faults are injected into real models on real data: a wrapper multiplies the loss, or a
hook the gradient, by NaN on chosen training steps. With ``nan_policy=skip`` those steps
are skipped and counted and every checkpoint written stays finite; with ``stop`` the run
ends with an error naming the step and the batch, and no checkpoint holds the fault.
Stage 1 (Lightning; stage 2 shares the same `StageModule`) and stage 3 (Accelerate).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file
from torch import nn

from lapo.checkpoint import safe_torch_load
from lapo.config import FinetuneConfig, PretrainConfig, load_config
from lapo.errors import NonFiniteLossError
from lapo.finetune import DecoderFit, Phase, Rows, run_phase
from lapo.lam import LAMModule
from lapo.models import ActionDecoder
from lapo.train import fit
from tests.datagen import NUM_ACTIONS, make_dataset

ROOT = Path(__file__).resolve().parents[1]
NAN = float("nan")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("nan-data"), shards=3, clip_frames=16).path


def lam_cfg(data: Path, policy: str, steps: int = 5) -> PretrainConfig:
    return load_config(
        PretrainConfig,
        ROOT / "configs/lam/debug.yaml",
        [f"data.path={data}", f"trainer.nan_policy={policy}", f"trainer.max_steps={steps}",
         "trainer.ckpt_every_n_steps=1", "trainer.keep_checkpoints=-1", "trainer.val_every_n_steps=100",
         "trainer.loggers=[]"],
    )  # fmt: skip


def poison_loss(module: LAMModule, bad_calls: set[int]) -> None:
    """The model's training loss becomes NaN on the given training calls (0-based)."""
    real, calls = module.model.loss, [0]

    def loss(*args, **kwargs):
        out = real(*args, **kwargs)
        if not module.model.training:
            return out
        calls[0] += 1
        return (out[0] * NAN, *out[1:]) if calls[0] - 1 in bad_calls else out

    module.model.loss = loss


def poison_grad(module: LAMModule, bad_calls: set[int]) -> None:
    """The loss stays finite but the IDM's first weight gets a NaN gradient on the given calls."""
    weight, calls = next(module.model.idm.parameters()), [0]

    def hook(grad: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        return grad * NAN if calls[0] - 1 in bad_calls else grad

    weight.register_hook(hook)


def assert_finite_checkpoints(run: Path) -> int:
    """Every checkpoint's weights and optimiser moments are finite; returns how many there are."""
    paths = sorted((run / "checkpoints").glob("*.ckpt"))
    for p in paths:
        ckpt = safe_torch_load(p)
        for k, v in ckpt["state_dict"].items():
            assert torch.isfinite(v.float()).all(), f"{p.name}: {k} is not finite"
        for state in ckpt["optimizer_states"][0]["state"].values():
            for k, v in state.items():
                assert torch.isfinite(v.float()).all(), f"{p.name}: optimiser {k} is not finite"
    return len(paths)


@pytest.mark.parametrize("poison", [poison_loss, poison_grad])
def test_lightning_skip_keeps_every_checkpoint_finite(data, tmp_path, poison):
    from lapo.data import VideoDataModule

    cfg = lam_cfg(data, "skip")
    module = LAMModule(cfg, num_actions=NUM_ACTIONS)
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    poison(module, {1, 3})
    result = fit(module, VideoDataModule(cfg.data), cfg.trainer, tmp_path / "run")
    assert result.trainer.global_step == 5 and module.nonfinite_steps == 2
    assert assert_finite_checkpoints(tmp_path / "run") == 6  # step-1..5 and last
    after = module.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before), "the good steps trained"
    assert all(torch.isfinite(v.float()).all() for v in after.values())


@pytest.mark.parametrize(
    ("poison", "what"), [(poison_loss, "loss"), (poison_grad, "gradient norm")]
)
def test_lightning_stop_names_step_batch_and_keys_and_saves_no_fault(data, tmp_path, poison, what):
    from lapo.data import VideoDataModule

    cfg = lam_cfg(data, "stop")
    module = LAMModule(cfg, num_actions=NUM_ACTIONS)
    poison(module, {2})
    with pytest.raises(
        NonFiniteLossError, match=rf"non-finite {what} .*at step 2, batch 2, keys \['rec"
    ):
        fit(module, VideoDataModule(cfg.data), cfg.trainer, tmp_path / "run")
    assert assert_finite_checkpoints(tmp_path / "run") == 3  # steps 1, 2 and last (at step 2)
    assert safe_torch_load(tmp_path / "run/checkpoints/last.ckpt")["global_step"] == 2


# --------------------------------------------------------------------------- stage 3


class Flaky(nn.Module):
    """A real decoder fit whose loss (via its output) or gradient turns NaN on chosen calls."""

    def __init__(self, inner: nn.Module, bad_calls: set[int], where: str):
        super().__init__()
        self.inner, self.bad, self.where, self.calls = inner, bad_calls, where, 0

    def forward(self, batch: dict) -> torch.Tensor:
        out = self.inner(batch)  # (B, A)
        if not self.training:
            return out
        self.calls += 1
        if self.calls - 1 not in self.bad:
            return out
        if self.where == "loss":
            return out * NAN
        out.register_hook(lambda g: g * NAN)  # finite loss, NaN gradient
        return out


def _rows(n: int, seed: int) -> Rows:
    g = torch.Generator().manual_seed(seed)
    actions = torch.randint(0, NUM_ACTIONS, (n,), generator=g)
    latent = torch.nn.functional.one_hot(actions, 16).float() + 0.1 * torch.randn(
        n, 16, generator=g
    )
    return Rows(latent=latent, actions=actions)


def _decoder_phase(bad: set[int], where: str) -> Phase:
    torch.manual_seed(0)
    decoder = ActionDecoder(16, num_actions=NUM_ACTIONS, hidden=16)
    make = lambda: Flaky(DecoderFit(decoder), bad, where)  # noqa: E731
    return Phase("decoder", make, _rows(64, 0), _rows(32, 1), 2, 1e-2, "label")


@pytest.mark.parametrize("where", ["loss", "grad"])
def test_finetune_skip_counts_and_keeps_checkpoints_finite(tmp_path, where):
    cfg = FinetuneConfig(batch_size=16, progress=False, nan_policy="skip", keep_checkpoints=5)
    with pytest.warns(UserWarning, match="skipping a step with a non-finite"):
        last = run_phase(Accelerator(cpu=True), _decoder_phase({1, 6}, where), cfg, tmp_path, True)
    assert last["nonfinite_steps"] == 2 and last["step"] == 8  # 2 epochs of 4 batches
    ckpts = sorted((tmp_path / "checkpoints" / "decoder").glob("epoch-*/model.safetensors"))
    assert len(ckpts) == 2
    first, second = (load_file(p) for p in ckpts)
    for w in (first, second):
        assert all(torch.isfinite(v).all() for v in w.values())
    assert any(not torch.equal(first[k], second[k]) for k in first), "the good steps trained"
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x.get("nonfinite_steps") for x in lines] == [1, 2]


@pytest.mark.parametrize(("where", "what"), [("loss", "loss"), ("grad", "gradient norm")])
def test_finetune_stop_names_phase_epoch_batch_and_step(tmp_path, where, what):
    cfg = FinetuneConfig(batch_size=16, progress=False, nan_policy="stop")
    with pytest.raises(
        NonFiniteLossError,
        match=rf"non-finite {what} .*at phase decoder, epoch 1, batch 1 \(step 5\)",
    ):
        run_phase(Accelerator(cpu=True), _decoder_phase({5}, where), cfg, tmp_path, True)
    # epoch 0 was saved before the fault; nothing after it
    done = sorted(p.parent.name for p in (tmp_path / "checkpoints/decoder").glob("*/progress.json"))
    assert done == ["epoch-0000"]
    weights = load_file(tmp_path / "checkpoints/decoder/epoch-0000/model.safetensors")
    assert all(torch.isfinite(v).all() for v in weights.values())
