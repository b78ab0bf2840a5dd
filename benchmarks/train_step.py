"""Stage-1 training step: lapo's Lightning Trainer against a plain PyTorch loop.

    python benchmarks/train_step.py                         # procgen config, CPU, batch 4
    python benchmarks/train_step.py --batch 16 --steps 5
    python benchmarks/train_step.py --config configs/lam/procgen_cpu.yaml --batch 32 --steps 6 \
        --runs plain,plain-nchw                             # what trainer.channels_last gains
    python benchmarks/train_step.py --config configs/lam/debug.yaml --steps 50   # tiny model:
                                                            # the framework's share is largest here
    python benchmarks/train_step.py --accelerator gpu --batch 128 --runs lightning --warmup 5
                                                            # the config's precision and compile
                                                            # on one GPU, with peak memory

Both runs train the same model (same seed) with the same optimiser, schedule, gradient
clipping and NaN check on the same synthetic uint8 batches of the config's shape
(B, k+1, 3, S, S), held in memory so that data loading costs nothing. The Lightning run
uses `lapo.trainer.build_trainer`, i.e. the trainer `lapo pretrain` runs (checkpoint,
signal and logging callbacks included; checkpoints and validation fall outside the timed
steps). Repeats alternate the two so that load from other jobs hits both alike.

Each step is timed from the end of one step to the end of the next: wall clock and this
process's CPU time (CPU seconds stay meaningful on a shared machine). Overhead is
(Lightning / plain - 1) of the median step; the target is < 5%. On a CPU the config's
precision and compile are replaced by fp32 and eager; ``--accelerator gpu`` keeps them,
synchronises the GPU at each step's end, and reports peak GPU memory
(torch.cuda.max_memory_allocated) per run. The plain loop runs on the CPU only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, IterableDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L  # noqa: E402

from lapo.callbacks import GracefulStop  # noqa: E402
from lapo.config import PretrainConfig, load_config  # noqa: E402
from lapo.lam import LAMModule  # noqa: E402
from lapo.trainer import build_trainer, resolve_hardware  # noqa: E402

NUM_ACTIONS = 15  # Procgen's action count


def make_batches(cfg: PretrainConfig, n: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    b, s, k = cfg.data.batch_size, cfg.model.image_size, cfg.data.context
    return [
        {
            "frames": torch.randint(0, 256, (b, k + 1, 3, s, s), dtype=torch.uint8, generator=g),
            "actions": torch.randint(0, NUM_ACTIONS, (b,), generator=g),
            "has_action": torch.ones(b, dtype=torch.bool),
            "key": [f"bench__c{i:05d}" for i in range(b)],
        }
        for _ in range(n)
    ]


class Replay(IterableDataset):
    """The same in-memory batches, round and round (already batched: batch_size=None)."""

    def __init__(self, batches: list[dict], length: int) -> None:
        self.batches, self.length = batches, length

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        for i in range(self.length):
            yield self.batches[i % len(self.batches)]


class Clock(L.Callback):
    def __init__(self) -> None:
        self.marks: list[tuple[float, float]] = []

    def on_train_batch_end(self, *_) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the step's kernels are done, not only queued
        self.marks.append((time.perf_counter(), time.process_time()))


def step_times(marks: list[tuple[float, float]], warmup: int) -> tuple[list[float], list[float]]:
    marks = marks[warmup:]
    wall = [b[0] - a[0] for a, b in zip(marks, marks[1:])]
    cpu = [b[1] - a[1] for a, b in zip(marks, marks[1:])]
    return wall, cpu


def run_lightning(
    cfg: PretrainConfig, batches: list[dict], steps: int, out: Path
) -> list[tuple[float, float]]:
    L.seed_everything(cfg.trainer.seed, verbose=False)
    module = LAMModule(cfg, num_actions=NUM_ACTIONS)
    clock = Clock()
    hw = resolve_hardware(cfg.trainer)
    module.compile_enabled = hw.compile  # as `lapo.train.fit` does
    trainer = build_trainer(cfg.trainer, out, hw, GracefulStop(out / "last.ckpt"))
    trainer.callbacks.append(clock)
    loader = DataLoader(Replay(batches, steps), batch_size=None)
    trainer.fit(module, train_dataloaders=loader)
    return clock.marks


def run_plain(
    cfg: PretrainConfig, batches: list[dict], steps: int, channels_last: bool
) -> list[tuple[float, float]]:
    L.seed_everything(cfg.trainer.seed, verbose=False)
    module = LAMModule(cfg, num_actions=NUM_ACTIONS)
    model = module.model.train()
    if channels_last:  # as StageModule.configure_model does under trainer.channels_last
        model.to(memory_format=torch.channels_last)
    # the same AdamW parameter groups and schedule (needs no trainer)
    opt_cfg = module.configure_optimizers()
    opt, sched = opt_cfg["optimizer"], opt_cfg["lr_scheduler"]["scheduler"]
    clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
    marks = []
    data = iter(DataLoader(Replay(batches, steps), batch_size=None))
    for batch in data:
        loss, logs, _ = model.loss(batch["frames"], batch["actions"], batch["has_action"])
        if bool(torch.isfinite(loss)):
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
        sched.step()
        marks.append((time.perf_counter(), time.process_time()))
    return marks


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--config",
        default="configs/lam/procgen.yaml",
        help="stage-1 YAML whose model and frame size to time",
    )
    p.add_argument(
        "--batch",
        type=int,
        default=4,
        help="windows per batch (procgen's 128 takes minutes a step on CPU)",
    )
    p.add_argument("--steps", type=int, default=3, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps at the start of each run")
    p.add_argument("--repeats", type=int, default=2, help="alternating (plain, Lightning) pairs")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    p.add_argument(
        "--accelerator",
        choices=("cpu", "gpu"),
        default="cpu",
        help="cpu: fp32, no compile; gpu: one GPU with the config's precision and compile",
    )
    p.add_argument(
        "--runs",
        default="plain,lightning",
        help="which loops to time, comma-separated: plain, lightning, and plain-nchw (the "
        "plain loop with every tensor in the default layout, against trainer.channels_last; "
        "plain loops need --accelerator cpu)",
    )
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.add_argument(
        "--set",
        dest="overrides",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="config overrides, e.g. trainer.log_every_n_steps=1 (the procgen config logs every 50)",
    )
    p.add_argument(
        "--out", default="/tmp/lapo-bench-train-step", help="scratch run directory for the Trainer"
    )
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    runs = [r for r in args.runs.split(",") if r]
    if not set(runs) <= {"plain", "lightning", "plain-nchw"} or not runs:
        p.error(f"--runs: plain, lightning and/or plain-nchw, got {args.runs!r}")
    gpu = args.accelerator == "gpu"
    if gpu and set(runs) - {"lightning"}:
        p.error("--runs plain: the plain loop runs on the CPU only; use --runs lightning")
    if gpu and not torch.cuda.is_available():
        p.error("--accelerator gpu: torch sees no CUDA device")
    hardware = (
        ["trainer.accelerator=gpu"]
        if gpu
        else ["trainer.accelerator=cpu", "trainer.precision=32-true", "trainer.compile=false"]
    )

    total = args.warmup + args.steps + 1  # +1: step times are differences between ends
    cfg = load_config(
        PretrainConfig,
        args.config,
        [
            f"data.batch_size={args.batch}", *hardware,
            "trainer.devices=1", "trainer.progress=false", "trainer.loggers=[csv]",
            f"trainer.max_steps={total}", f"trainer.val_every_n_steps={total + 1}",
            f"trainer.ckpt_every_n_steps={total + 1}", f"trainer.image_every_n_steps={total + 1}",
            *args.overrides,
        ],
    )  # fmt: skip
    batches = make_batches(cfg, n=4)
    s, k = cfg.model.image_size, cfg.data.context
    print(
        f"config {args.config}: frames ({args.batch}, {k + 1}, 3, {s}, {s}) uint8, "
        f"{cfg.model.encoder} encoder, {cfg.model.bottleneck} bottleneck; "
        f"{args.steps} timed steps x {args.repeats} repeats, torch threads {torch.get_num_threads()}; "
        f"{args.accelerator}, precision {cfg.trainer.precision}, compile {cfg.trainer.compile}"
    )
    results: dict[str, tuple[list[float], list[float]]] = {n: ([], []) for n in runs}
    peak: dict[str, float] = {}
    for r in range(args.repeats):
        for name in runs:
            out = Path(args.out) / f"{name}-{r}"
            if gpu:
                torch.cuda.reset_peak_memory_stats()
            marks = (
                run_lightning(cfg, batches, total, out)
                if name == "lightning"
                else run_plain(cfg, batches, total, cfg.trainer.channels_last and name == "plain")
            )
            if gpu:
                peak[name] = max(peak.get(name, 0.0), torch.cuda.max_memory_allocated() / 2**30)
            wall, cpu = step_times(marks, args.warmup)
            results[name][0].extend(wall)
            results[name][1].extend(cpu)
            print(
                f"  repeat {r} {name:9s}: median step {statistics.median(wall):.3f} s wall, {statistics.median(cpu):.3f} s CPU"
            )

    med = {n: (statistics.median(w), statistics.median(c)) for n, (w, c) in results.items()}
    for name, (wall, cpu) in med.items():
        print(
            f"{name:9s}: {args.batch / wall:8.2f} samples/s (wall)   {args.batch / cpu:8.2f} samples/CPU-s   step {wall * 1e3:9.1f} ms wall, {cpu * 1e3:9.1f} ms CPU"
        )
        if name in peak:
            print(
                f"{name:9s}: peak GPU memory {peak[name]:.2f} GiB (torch.cuda.max_memory_allocated)"
            )
    if args.json:
        summary = {
            n: {"windows_per_s": args.batch / w, "step_ms": w * 1e3, "peak_gib": peak.get(n)}
            for n, (w, _) in med.items()
        }
        summary["config"] = {"path": args.config, "batch": args.batch, "precision": cfg.trainer.precision,
                             "compile": cfg.trainer.compile, "accelerator": args.accelerator}  # fmt: skip
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    if {"plain", "plain-nchw"} <= set(runs):
        print(
            f"channels-last (trainer.channels_last={cfg.trainer.channels_last}) against the "
            f"default layout: {100 * (1 - med['plain'][0] / med['plain-nchw'][0]):+.1f}% "
            "off the median step (wall)"
        )
    if not {"plain", "lightning"} <= set(runs):
        return  # the overhead needs both loops
    best = {n: (min(w), min(c)) for n, (w, c) in results.items()}
    print(
        "least-disturbed step (min): "
        f"plain {best['plain'][0] * 1e3:.1f} ms wall / {best['plain'][1] * 1e3:.1f} ms CPU, "
        f"lightning {best['lightning'][0] * 1e3:.1f} ms wall / {best['lightning'][1] * 1e3:.1f} ms CPU "
        f"({100 * (best['lightning'][1] / best['plain'][1] - 1):+.1f}% CPU)"
    )
    wall_ratio = med["lightning"][0] / med["plain"][0] - 1
    cpu_ratio = med["lightning"][1] / med["plain"][1] - 1
    print(
        f"overhead of Lightning: {100 * wall_ratio:+.1f}% wall, {100 * cpu_ratio:+.1f}% CPU "
        f"({(med['lightning'][0] - med['plain'][0]) * 1e3:+.1f} ms per step); target < 5%"
    )


if __name__ == "__main__":
    main()
