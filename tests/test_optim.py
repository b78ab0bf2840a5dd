"""The optimiser pieces every stage shares (`lapo.optim`): parameter groups and the schedule.

Stage 3 must train with the same no-decay groups as stages 1 and 2 (checked in the
optimiser state a real phase saves), and its cosine must be the one it always computed.
"""

from __future__ import annotations

import math

import torch
from accelerate import Accelerator

from lapo.config import FinetuneConfig, OptimConfig
from lapo.finetune import DecoderFit, Phase, Rows, run_phase
from lapo.models import ActionDecoder
from lapo.optim import adamw, decayed_names, lr_lambda, warmup_cosine


def test_cosine_without_warm_up_is_stage_3s_schedule_bit_for_bit():
    for i in range(101):
        frac = i / 100
        old = 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))  # finetune's inline formula
        assert 3e-4 * warmup_cosine(i, frac) == 3e-4 * old
    assert warmup_cosine(7, 2.5) == 0.0  # past the end (a spent time budget): stays at 0


def test_lr_lambda_is_warmup_cosine_over_the_steps_after_warm_up():
    f = lr_lambda(OptimConfig(warmup_steps=4, min_lr_ratio=0.2), max_steps=24)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == 1.0 and f(14) == warmup_cosine(14, 0.5, min_lr_ratio=0.2)
    assert f(24) == f(100) == 0.2


def test_biases_and_norm_gains_take_no_weight_decay():
    torch.manual_seed(0)
    decoder = ActionDecoder(8, num_actions=3, hidden=16)
    names = {id(p): n for n, p in decoder.named_parameters()}
    opt = adamw(decoder.named_parameters(), decayed_names(decoder), lr=1e-3, weight_decay=0.1)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"]) and decay["params"]
    assert all(p.ndim == 1 for p in no_decay["params"]) and no_decay["params"]
    assert len(decay["params"]) + len(no_decay["params"]) == len(names)


def test_a_stage_3_phase_trains_with_the_no_decay_groups(tmp_path):
    g = torch.Generator().manual_seed(0)
    rows = Rows(
        latent=torch.randn(32, 8, generator=g), actions=torch.randint(0, 3, (32,), generator=g)
    )
    cfg = FinetuneConfig(epochs=1, batch_size=16, progress=False, weight_decay=0.05)
    torch.manual_seed(0)
    decoder = ActionDecoder(8, num_actions=3, hidden=16)
    phase = Phase("decoder", lambda: DecoderFit(decoder), rows, rows, 1, 1e-3, "label")
    run_phase(Accelerator(cpu=True), phase, cfg, tmp_path, discrete=True)
    saved = torch.load(tmp_path / "checkpoints/decoder/epoch-0000/optimizer.bin", weights_only=True)
    assert [grp["weight_decay"] for grp in saved["param_groups"]] == [0.05, 0.0]
    assert all(grp["params"] for grp in saved["param_groups"])
