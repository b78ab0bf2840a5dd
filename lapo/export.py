"""``lapo export``: a run's weights as safetensors + JSON, loadable without pickle.

    lapo export --run RUN --out DIR [--checkpoint last|step-0000400|PATH]

What DIR receives depends on what RUN is:

| RUN                             | DIR gets                              | loaded by               |
| ------------------------------- | ------------------------------------- | ----------------------- |
| stage 1 (`lapo pretrain`)       | `model.safetensors` + `model.json`    | `lapo.runs.load_lam`    |
| stage 2 (`lapo train-policy`)   | `policy.safetensors` + `policy.json`  | `lapo.runs.load_policy` |
| stage 3 (`lapo finetune`)       | `agent.safetensors` + `agent.json`    | `lapo.runs.load_agent`  |
| a stage-1 or 2 `.ckpt` file     | as for its stage                      | as for its stage        |

For stages 1 and 2 the source is ``--checkpoint`` when given (a name under
RUN/checkpoints or a path); otherwise the run's own export when training finished,
else its newest checkpoint (so an unfinished or preempted run can be exported too).
Checkpoints are read with ``torch.load(weights_only=True)``: a file holding code is
refused. A stage-3 run exports its finished agent; its epoch checkpoints hold one
phase's parts, not an agent. The files are written by `lapo.runs.export_model`
(and copied for an existing export), so DIR has exactly the layout training writes.
"""

from __future__ import annotations

import argparse
import shutil
from dataclasses import dataclass
from pathlib import Path

from lapo.checkpoint import CheckpointError, resume_checkpoint, safe_torch_load
from lapo.config import PolicyConfig, PretrainConfig, from_dict
from lapo.io import atomic_write
from lapo.runs import (
    LAM_KIND,
    POLICY_KIND,
    POLICY_NAME,
    export_model,
    load_agent,
    load_lam,
    load_policy,
    policy_extra,
)

# exported kind -> the file stem training writes it under
STEMS = {LAM_KIND: "model", POLICY_KIND: POLICY_NAME, "agent": "agent"}


@dataclass
class Exported:
    kind: str
    """lam, policy or agent."""
    files: list[Path]
    """The two files written under --out."""
    source: Path
    """The checkpoint or run directory the weights came from."""
    step: int | None = None
    """Training step of the source checkpoint (None for a run's own export)."""


def export_run(run: str | Path, out: str | Path, checkpoint: str | None = None) -> Exported:
    """Export `run` (a run directory or a stage-1/2 checkpoint file) into `out`."""
    run = Path(run)
    if not run.exists():
        raise CheckpointError(f"--run {run} does not exist")
    if run.is_file():
        return export_checkpoint(run, out)
    if checkpoint:
        return export_checkpoint(checkpoint_path(run, checkpoint), out)
    kind = exported_kind(run)
    if kind is not None:
        return copy_export(run, out, kind)
    if not (run / "checkpoints").is_dir():
        raise CheckpointError(
            f"--run {run}: neither a lapo run (no model.json, policy.json, agent.json or "
            "checkpoints/) nor a checkpoint file"
        )
    return export_checkpoint(resume_checkpoint(run), out)


def checkpoint_path(run: Path, name: str) -> Path:
    """``last`` / ``step-0000400`` (under RUN/checkpoints, ``.ckpt`` optional) or a path."""
    for p in (Path(name), run / "checkpoints" / name, run / "checkpoints" / f"{name}.ckpt"):
        if p.is_file():
            return p
    have = sorted(p.stem for p in (run / "checkpoints").glob("*.ckpt"))
    raise CheckpointError(f"--checkpoint {name}: not found in {run}/checkpoints (there: {have})")


def exported_kind(run: Path) -> str | None:
    """The kind of model `run` already holds an export of, if any."""
    found = [k for k, stem in STEMS.items() if (run / f"{stem}.json").is_file()]
    if len(found) > 1:
        raise CheckpointError(f"--run {run} holds several exports ({found}); export one checkpoint")
    return found[0] if found else None


def copy_export(run: Path, out: str | Path, kind: str) -> Exported:
    """Load the run's export with the pickle-free loader (so a broken one fails), then copy it."""
    {LAM_KIND: load_lam, POLICY_KIND: load_policy, "agent": load_agent}[kind](run)
    out = Path(out)
    files = []
    for ext in ("safetensors", "json"):
        name = f"{STEMS[kind]}.{ext}"
        if (run / name).resolve() != (out / name).resolve():
            atomic_write(out / name, lambda tmp, src=run / name: shutil.copyfile(src, tmp))
        files.append(out / name)
    return Exported(kind, files, run)


def export_checkpoint(path: str | Path, out: str | Path) -> Exported:
    """Rebuild the module of a stage-1/2 Lightning checkpoint and export it (no pickle code runs)."""
    path = Path(path)
    ckpt = safe_torch_load(path)
    if not isinstance(ckpt, dict):
        ckpt = {}  # a bare tensor or list: reported below as not a lapo checkpoint
    hp, state = ckpt.get("hyper_parameters") or {}, ckpt.get("state_dict") or {}
    step = int(ckpt["global_step"]) if "global_step" in ckpt else None
    if "model_kwargs" in hp:  # lapo.lam.LAMModule
        from lapo.models import LatentActionModel

        cfg = from_dict(PretrainConfig, hp["config"])
        model = LatentActionModel(cfg.model, **hp["model_kwargs"], sync_codebook=False)
        weights = _load_part(model, state, "model.", path)
        written = export_model(
            out,
            model,
            kind=LAM_KIND,
            config=hp["config"],
            extra=hp["model_kwargs"],
            state_dict=weights,
        )
        kind = LAM_KIND
    elif "lam" in hp:  # lapo.policy.PolicyModule: the LAM run gives the policy's shape
        from lapo.models import LatentPolicy

        cfg = from_dict(PolicyConfig, hp["config"])
        lam_run = Path(hp["lam"]["run"])
        if not (lam_run / "model.json").is_file():
            raise CheckpointError(
                f"{path}: a stage-2 checkpoint, whose shape comes from its LAM run {lam_run}, "
                "which is not here; export the finished run (policy.json) instead"
            )
        policy = LatentPolicy.for_lam(cfg.policy, load_lam(lam_run))
        weights = _load_part(policy, state, "policy.", path)
        written = export_model(
            out, policy, kind=POLICY_KIND, config=hp["config"],
            extra=policy_extra(policy, hp["lam"]), state_dict=weights, name=POLICY_NAME,
        )  # fmt: skip
        kind = POLICY_KIND
    else:
        raise CheckpointError(
            f"{path}: not a checkpoint of lapo pretrain or lapo train-policy (no lapo settings in "
            "its hyper_parameters)"
        )
    return Exported(kind, [written, written.with_suffix(".json")], path, step)


def _load_part(module, state: dict, prefix: str, path: Path) -> dict:
    """The weights under `prefix`, checked against `module` (strict: every key, every shape)."""
    weights = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    try:
        module.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise CheckpointError(
            f"{path}: weights do not fit the model its settings build: {first}"
        ) from None
    return weights


# --------------------------------------------------------------------------- the command


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "export",
        help="write a run's weights as safetensors + json from a checkpoint",
        description="Write the model of a lapo run as safetensors weights plus a JSON config, "
        "loadable without pickle (lapo.runs.load_lam, load_policy, load_agent). Stage 1 and 2 runs export their finished model, or a checkpoint "
        "(the newest when training did not finish); checkpoints are read with weights_only=True.",
    )
    p.add_argument(
        "--run",
        required=True,
        help="run directory of lapo pretrain / train-policy / finetune, or a stage-1/2 .ckpt file",
    )
    p.add_argument("--out", required=True, help="directory for the .safetensors + .json pair")
    p.add_argument(
        "--checkpoint",
        help="stages 1/2: a checkpoint name under RUN/checkpoints (last, step-0000400) or a path "
        "(default: the finished export, else the newest checkpoint)",
    )
    return p


def run(args: argparse.Namespace) -> int:
    done = export_run(args.run, args.out, args.checkpoint)
    at = f", step {done.step}" if done.step is not None else ""
    names = " + ".join(f.name for f in done.files)
    print(f"lapo export: {done.kind} from {done.source}{at} -> {args.out}: {names}")
    return 0
