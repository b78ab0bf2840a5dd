"""Stage 3's training loop (Accelerate): one phase, epoch by epoch, resumable at any step.

Each epoch visits the training rows in an order fixed by (seed, epoch), ends with an
evaluation on the held-out rows, a line in RUN_F/metrics.jsonl and a checkpoint
(`lapo.finetune.state`). AdamW, its parameter groups and the cosine schedule are
`lapo.optim`'s, the non-finite rule `lapo.errors.NonFiniteSteps` and the stop signal
`lapo.preempt.StopSignal`: the same as stages 1 and 2. Every decision that must be the
same on all ranks (stop, skip a non-finite step, time is up) is agreed with one
all-reduce per step.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from lapo.agent import action_loss
from lapo.config import FinetuneConfig
from lapo.errors import NonFiniteSteps
from lapo.finetune.state import BestWeights, complete_checkpoints, load_checkpoint, save_checkpoint
from lapo.optim import adamw, decayed_names, set_lr, warmup_cosine
from lapo.preempt import StopRequested, StopSignal


class EpochSampler(Sampler[int]):
    """A permutation that is a pure function of (seed, epoch): a resumed run replays the same order."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())


@dataclass
class Phase:
    name: str  # checkpoint folder and metrics prefix: decoder, policy, idm, bc
    make: Callable[[], nn.Module]  # built when the phase starts, after the phases before it
    train: Dataset
    val: Dataset
    epochs: int
    lr: float
    metric: str  # what the held-out evaluation measures: label or act


def agree(acc: Accelerator, *flags: bool) -> list[bool]:
    """Each flag OR-ed over all processes (one small all-reduce): every rank acts alike."""
    if acc.num_processes == 1:
        return list(flags)
    t = torch.tensor([float(f) for f in flags], device=acc.device)
    return [bool(v > 0) for v in acc.reduce(t, "sum")]


def heldout_metrics(acc: Accelerator, model: nn.Module, loader: DataLoader, discrete: bool) -> dict:
    """Held-out accuracy (discrete) or MSE (continuous), over every rank's share."""
    model.eval()
    outs, targets = [], []
    with torch.no_grad():
        for batch in loader:
            out, y = acc.gather_for_metrics((model(batch).float(), batch["actions"]))
            outs.append(out.cpu())
            targets.append(y.cpu())
    model.train()
    out, y = torch.cat(outs), torch.cat(targets)
    if discrete:
        return {
            "accuracy": (out.argmax(-1) == y).float().mean().item(),
            "loss": action_loss(out, y, True).item(),
        }
    return {"mse": action_loss(out, y, False).item()}


def _resume_point(acc: Accelerator, root: Path, name: str) -> tuple[int, int, dict, dict | None]:
    """(first epoch, step, its progress, the progress of a mid-epoch stop or None) to go on from."""
    done = complete_checkpoints(root)
    if not done:  # only present with --resume (a fresh run refuses an existing RUN_F)
        return 0, 0, {}, None
    last = load_checkpoint(acc, done[-1])
    if "batch" in last:  # saved mid-epoch by a signal: finish that epoch first
        acc.print(f"lapo finetune: {name}: resumed in epoch {last['epoch']} after batch "
                  f"{last['batch']} (step {last['step']})")  # fmt: skip
        return last["epoch"], last["step"], last, last
    acc.print(f"lapo finetune: {name}: resumed after epoch {last['epoch']} (step {last['step']})")
    return last["epoch"] + 1, last["step"], last, None


def run_phase(
    acc: Accelerator,
    ph: Phase,
    cfg: FinetuneConfig,
    run_dir: Path,
    discrete: bool,
    stop: StopSignal | None = None,
) -> dict:
    """Train one phase with checkpoints and per-epoch evaluation; returns its last epoch's metrics.

    Biases and norm gains take no weight decay (`lapo.optim.adamw`), as in stages 1 and 2.
    Raises `StopRequested` once `stop` has caught a signal and the state is saved.
    """
    root = run_dir / "checkpoints" / ph.name
    sampler = EpochSampler(len(ph.train), cfg.seed)
    train_dl = DataLoader(ph.train, cfg.batch_size, sampler=sampler, num_workers=cfg.num_workers)
    val_dl = DataLoader(ph.val, cfg.eval_batch_size, shuffle=False, num_workers=cfg.num_workers)
    module = ph.make()
    opt = adamw(module.named_parameters(), decayed_names(module), lr=ph.lr,
                weight_decay=cfg.weight_decay)  # fmt: skip
    model, opt, train_dl, val_dl = acc.prepare(module, opt, train_dl, val_dl)
    total = ph.epochs * len(train_dl)
    start, step, last, resumed = _resume_point(acc, root, ph.name)
    stop, nonfinite = stop or StopSignal(), NonFiniteSteps(cfg.nan_policy, who="lapo finetune")
    best = BestWeights(acc, root, discrete) if cfg.keep_best else None
    if best is not None and not last and ph.name == "policy":
        best.offer(acc.unwrap_model(model), heldout_metrics(acc, model, val_dl, discrete), -1)
    budget, t_start, out_of_time = cfg.max_minutes * 60, time.time(), False
    clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
    for epoch in range(start, ph.epochs):
        train_dl.set_epoch(epoch)
        model.train()
        # batches already trained in this epoch (same order: EpochSampler), their loss sum
        first = resumed["batch"] if resumed and epoch == start else 0
        loss_sum = torch.tensor(resumed["loss_sum"] if first else 0.0, device=acc.device)
        n = resumed["batches"] if first else 0
        bar = tqdm(train_dl, desc=f"{ph.name} {epoch + 1}/{ph.epochs}", leave=False,
                   disable=not (cfg.progress and acc.is_local_main_process))  # fmt: skip
        for i, batch in enumerate(bar):
            if i < first:
                continue
            elapsed = time.time() - t_start
            done_frac = step / max(total, 1)
            if budget:  # a time budget: the schedule follows whichever runs out first
                done_frac = max(done_frac, elapsed / budget)
            lr = ph.lr * warmup_cosine(step, done_frac)  # cosine to 0, no warm-up
            set_lr(opt, lr)
            loss = action_loss(model(batch), batch["actions"], discrete)
            stopping, bad, out_of_time = agree(
                acc, stop.requested, not bool(torch.isfinite(loss)), bool(budget) and elapsed >= budget
            )  # fmt: skip
            if out_of_time and not stopping:  # this batch is not trained; the epoch ends here
                acc.print(f"lapo finetune: {ph.name}: the {cfg.max_minutes:g} min time budget "
                          f"is spent in epoch {epoch + 1} (step {step})")  # fmt: skip
                break
            if stopping:  # this batch is not trained: a resumed run starts with it
                progress = {"phase": ph.name, "epoch": epoch, "batch": i, "step": step,
                            "loss_sum": float(loss_sum), "batches": n, "signal": stop.name}  # fmt: skip
                path = root / f"epoch-{epoch:04d}-batch-{i:06d}"
                save_checkpoint(acc, path, progress, cfg.keep_checkpoints)
                raise StopRequested(
                    f"{stop.name} in phase {ph.name}, epoch {epoch}, batch {i} (step {step})"
                )
            where = f"phase {ph.name}, epoch {epoch}, batch {i} (step {step})"
            if bad:
                nonfinite("loss", loss.item(), where)
            else:
                acc.backward(loss)
                norm = acc.clip_grad_norm_(model.parameters(), clip)  # of the all-reduced grads
                # (fp16's grad scaler skips inf gradients itself)
                if acc.scaler is None and norm is not None and not torch.isfinite(norm):
                    nonfinite("gradient norm", float(norm), where)
                else:
                    opt.step()
                    loss_sum, n = loss_sum + loss.detach(), n + 1
            opt.zero_grad(set_to_none=True)
            step += 1
            bar.set_postfix(loss=f"{loss.item():.4f}")
        train_loss = acc.reduce(loss_sum / max(n, 1), "mean").item()
        val = heldout_metrics(acc, model, val_dl, discrete)
        last = {"phase": ph.name, "epoch": epoch, "step": step, "train_loss": train_loss, "lr": lr,
                **{f"{ph.metric}_{k}": v for k, v in val.items()}, "time": time.time()}  # fmt: skip
        if nonfinite.count:
            last["nonfinite_steps"] = nonfinite.count
        if out_of_time:
            last["time_budget_spent"] = True
        if best is not None:
            best.offer(acc.unwrap_model(model), val, epoch)
        save_checkpoint(acc, root / f"epoch-{epoch:04d}", last, cfg.keep_checkpoints)
        if acc.is_main_process:
            with open(run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(last) + "\n")
        shown = ", ".join(
            f"{k} {v:.4f}" for k, v in last.items() if k.startswith(ph.metric) or k == "train_loss"
        )
        acc.print(f"{ph.name} epoch {epoch + 1}/{ph.epochs}: {shown}")
        if agree(acc, stop.requested)[0]:  # saved just now: stop without another save
            raise StopRequested(f"{stop.name} after phase {ph.name}, epoch {epoch} (step {step})")
        if out_of_time:
            break
    if best is not None and best.epoch is not None and best.epoch != last.get("epoch"):
        best.restore(acc.unwrap_model(model))
        last = {**last, **{f"{ph.metric}_{k}": v for k, v in best.val.items()}}
        start_note = "its starting point" if best.epoch < 0 else f"epoch {best.epoch + 1}"
        acc.print(f"lapo finetune: {ph.name}: keeping {start_note}, the best on held-out data")
    if best is not None and best.epoch is not None:
        last["kept_epoch"] = best.epoch
    acc.wait_for_everyone()
    acc.free_memory()  # the next phase prepares its own model and optimiser
    return last
