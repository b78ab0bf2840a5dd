"""One stage-3 run, from its inputs to RUN_F: check, select the labels, train the phases, save.

RUN_F holds config.yaml and sources.json (what `--resume` insists are unchanged),
selection.json, metrics.jsonl, checkpoints/, and at the end agent.safetensors +
agent.json (self-contained: `lapo label --model RUN_F` needs nothing else) and metrics.json.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader

from lapo.agent import Agent
from lapo.config import ConfigError, FinetuneConfig, save_config
from lapo.finetune.loop import run_phase
from lapo.finetune.plan import make_plan, window_shape
from lapo.io import atomic_write_json
from lapo.labelled import LabelledWindows, load_selection, scan_labelled, select_budget
from lapo.preempt import StopRequested, StopSignal
from lapo.resume import check_run_dir
from lapo.runs import check_policy_run, read_lam, save_agent

RESUME_FREE = ("progress", "num_workers", "keep_checkpoints", "mixed_precision", "eval_batch_size",
               "nan_policy")  # fmt: skip
"""Settings a resumed run may change: they do not alter what it trains."""


def _prepare_run(
    acc: Accelerator, cfg: FinetuneConfig, run_dir: Path, sources: dict, resume: bool
) -> None:
    """Refuse to overwrite a run; on resume insist on the same settings and inputs."""
    check_run_dir(cfg, run_dir, sources, resume=resume, free=RESUME_FREE, what="finetune run")
    acc.wait_for_everyone()  # every rank has checked before anything is written
    if acc.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        atomic_write_json(run_dir / "sources.json", sources)
    acc.wait_for_everyone()


def run_sources(labeled: str | Path, lam: str | Path | None, policy: str | Path | None) -> dict:
    """The inputs of a run as sources.json records them (absolute paths)."""
    return {"labeled": str(Path(labeled).resolve()), "lam": lam and str(Path(lam).resolve()),
            "policy": policy and str(Path(policy).resolve())}  # fmt: skip


def make_accelerator(mixed_precision: str) -> Accelerator:
    """Accelerator for this process. Without CUDA it is told cpu=True, which is what makes
    Accelerate join the gloo process group that `accelerate launch --multi_gpu` or
    `torchrun` set up (a CPU machine otherwise runs every process on its own)."""
    cuda = torch.cuda.is_available()
    if mixed_precision == "fp16" and not cuda:
        warnings.warn("lapo finetune: fp16 needs a GPU; training in full precision", stacklevel=2)
        mixed_precision = "no"
    return Accelerator(mixed_precision=mixed_precision, cpu=not cuda)


@torch.no_grad()
def final_metrics(
    acc: Accelerator, agent: Agent, val: LabelledWindows, cfg: FinetuneConfig
) -> dict:
    """The saved agent's own label() / act() on the held-out split (every rank's share)."""
    agent.eval()
    loader = acc.prepare(DataLoader(val, cfg.eval_batch_size, shuffle=False))
    got: dict[str, list] = {"label": [], "act": [], "true": []}
    for batch in loader:
        frames, y = batch["frames"], batch["actions"]  # (B, k+1, 3, H, W), (B,) / (B, D)
        got["true"].append(acc.gather_for_metrics(y).cpu())
        if agent.method != "bc":
            got["label"].append(acc.gather_for_metrics(agent.label(frames)["action"]).cpu())
        if agent.has_policy:
            got["act"].append(acc.gather_for_metrics(agent.act(frames[:, :-1])).cpu())
    acc.free_memory()
    y = torch.cat(got["true"])
    out = {"val_transitions": len(y)}
    if agent.discrete:
        out["majority_baseline"] = torch.bincount(y).max().item() / max(len(y), 1)
    for name in ("label", "act"):
        if got[name]:
            pred = torch.cat(got[name])
            if agent.discrete:
                out[f"{name}_accuracy"] = (pred == y).float().mean().item()
            else:
                out[f"{name}_mse"] = (pred.float() - y.float()).pow(2).mean().item()
    if "label_accuracy" in out or "label_mse" in out:  # the name `lapo evaluate` reports too
        out["decoder_accuracy" if agent.discrete else "decoder_mse"] = out.get(
            "label_accuracy", out.get("label_mse")
        )
    return out


def finetune(
    cfg: FinetuneConfig,
    run_dir: str | Path,
    labeled: str | Path,
    *,
    lam: str | Path | None = None,
    policy: str | Path | None = None,
    resume: bool = False,
    accelerator: Accelerator | None = None,
) -> dict:
    """Run stage 3 into `run_dir`; returns the final metrics (also RUN_F/metrics.json).

    A signal stops it at the next step with its state saved: it then returns
    ``{"finished": False, ...}`` and `resume` continues it.
    """
    run_dir = Path(run_dir)
    if cfg.method == "lapo" and not lam:
        raise ConfigError(
            "method lapo: needs --lam RUN (a stage-1 run); the baselines idm-supervised and bc do not"
        )
    if cfg.method == "bc" and (lam or policy):
        warnings.warn("lapo finetune: method bc ignores --lam and --policy", stacklevel=2)
        lam = policy = None
    if cfg.method == "idm-supervised" and policy:
        warnings.warn("lapo finetune: method idm-supervised ignores --policy", stacklevel=2)
        policy = None
    if cfg.finetune_policy and not policy:
        raise ConfigError("finetune_policy: needs --policy RUN_P (the stage-2 policy to fine-tune)")
    lam_run = read_lam(lam) if lam else None  # model.json of the LAM, parsed once
    if policy:
        check_policy_run(policy, lam_run)
    acc = accelerator or make_accelerator(cfg.mixed_precision)
    k, gap = window_shape(cfg, lam_run)
    # select before writing anything: a budget the data cannot meet leaves no run behind
    index = scan_labelled(labeled, context=k, frame_gap=gap)
    sel = select_budget(index, cfg.label_budget, cfg.seed, cfg.val_fraction, val_max=cfg.val_max)
    _prepare_run(acc, cfg, run_dir, run_sources(labeled, lam, policy), resume)
    set_seed(cfg.seed)  # same initial weights on every rank
    t0 = time.time()
    split = load_selection(index, sel, progress=cfg.progress and acc.is_local_main_process)
    if acc.is_main_process:
        atomic_write_json(run_dir / "selection.json", split.selection.summary(), indent=None)
    acc.print(f"lapo finetune (method {cfg.method}): {len(split.train)} labelled transitions for "
              f"training, {len(split.val)} held out in {len(split.selection.heldout_episodes)} "
              "episodes")  # fmt: skip
    plan = make_plan(cfg, split, lam_run, policy and str(policy), acc.device)
    discrete = split.action_space["type"] == "discrete"
    try:
        with StopSignal() as stop:
            phases = {
                ph.name: run_phase(acc, ph, cfg, run_dir, discrete, stop) for ph in plan.phases
            }
    except StopRequested as e:
        acc.wait_for_everyone()
        acc.print(f"lapo finetune: stopped early by {e}; state saved, resume with --resume")
        return {"method": cfg.method, "finished": False, "stopped": str(e)}
    agent = plan.agent.to(acc.device)
    metrics = {"method": cfg.method, "finished": True, **final_metrics(acc, agent, split.val, cfg), "phases": phases,
               "selection": split.selection.info, "seconds": time.time() - t0,
               "num_processes": acc.num_processes}  # fmt: skip
    if acc.is_main_process:
        agent.info["metrics"] = {
            k: v for k, v in metrics.items() if isinstance(v, (int, float, str))
        }
        save_agent(agent, run_dir, lam_config=plan.lam_config, lam_kwargs=plan.lam_kwargs, policy_config=plan.policy_config)  # fmt: skip
        atomic_write_json(run_dir / "metrics.json", metrics)
    acc.wait_for_everyone()
    shown = ", ".join(
        f"{k} {v:.4f}" for k, v in metrics.items() if k.endswith(("accuracy", "mse", "baseline"))
    )
    acc.print(
        f"lapo finetune (method {cfg.method}): done in {metrics['seconds']:.0f} s; {shown}; "
        f"agent in {run_dir}"
    )
    return metrics
