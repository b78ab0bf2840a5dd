"""Untrusted files: a checkpoint, export or config from elsewhere must never run code.

The hostile files are real pickles whose loading runs ``touch MARKER`` (shown to work by
loading one with ``weights_only=False`` in a throw-away process). Each is handed to
every reader a user can point at a file: ``--resume`` of the Lightning stages (through
lapo's check and through the checkpoint IO Lightning itself loads with, even when the
environment asks torch for unsafe loading), ``lapo finetune --resume`` (Accelerate's
state files), `load_lam` / `load_policy` / `load_agent` (safetensors), ``lapo export``,
and YAML configs with Python tags. Every one must refuse with a clear error and the
marker must never appear.
"""

from __future__ import annotations

import os
import pickle
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lapo.agent import AgentError
from lapo.callbacks import AtomicCheckpointIO
from lapo.checkpoint import CheckpointError, safe_torch_load
from lapo.cli import main as lapo_main
from lapo.config import (
    ConfigError,
    FinetuneConfig,
    PolicyConfig,
    PretrainConfig,
    load_config,
    to_dict,
)
from lapo.finetune import finetune
from lapo.models import LatentActionModel, LatentPolicy
from lapo.runs import (
    export_model,
    lam_info,
    load_agent,
    load_lam,
    load_policy,
    policy_extra,
    read_lam,
)
from tests.datagen import make_dataset

ROOT = Path(__file__).resolve().parents[1]
LAM_DEBUG = ROOT / "configs/lam/debug.yaml"


class Payload:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


@pytest.fixture
def marker(tmp_path) -> Path:
    m = tmp_path / "PWNED"
    yield m
    assert not m.exists(), "a hostile file ran code"


def hostile_checkpoint(path: Path, marker: Path, *, legacy: bool = False) -> Path:
    """A file shaped like a Lightning checkpoint with a code-running object inside."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ckpt = {"global_step": 3, "state_dict": {}, "hyper_parameters": {"x": Payload(marker)}}
    if legacy:  # a bare pickle stream rather than torch's zip format
        path.write_bytes(pickle.dumps(ckpt))
    else:
        torch.save(ckpt, path)
    return path


def test_the_payload_really_runs_code_when_loaded_unsafely(tmp_path):
    evil = hostile_checkpoint(tmp_path / "evil.ckpt", tmp_path / "ran")
    code = f"import torch; torch.load({str(evil)!r}, weights_only=False)"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=120, capture_output=True)
    assert (tmp_path / "ran").exists()  # so the refusals below are refusals of real code


@pytest.mark.parametrize("legacy", [False, True])
def test_pretrain_resume_refuses_a_hostile_last_ckpt(tmp_path, marker, capsys, monkeypatch, legacy):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # a careless environment
    run = tmp_path / "run"
    hostile_checkpoint(run / "checkpoints" / "last.ckpt", marker, legacy=legacy)
    args = ["pretrain", "--config", str(LAM_DEBUG), "--data", str(tmp_path / "no-data"),
            "--out", str(run), "--resume"]  # fmt: skip
    assert lapo_main(args) == 2
    err = capsys.readouterr().err
    assert "last.ckpt" in err and ("refused" in err or "not a readable" in err), err
    assert "Traceback" not in err


def test_lightnings_own_checkpoint_loader_refuses_even_when_asked_to_unpickle(
    tmp_path, marker, monkeypatch
):
    """What trainer.fit(ckpt_path=...) and a Slurm hpc_ckpt restore call: the Trainer's IO."""
    from lapo.callbacks import GracefulStop
    from lapo.trainer import build_trainer, resolve_hardware

    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    cfg = load_config(PretrainConfig, LAM_DEBUG, ["trainer.loggers=[]"])
    trainer = build_trainer(
        cfg.trainer, tmp_path, resolve_hardware(cfg.trainer), GracefulStop(tmp_path / "l")
    )
    io = trainer.strategy.checkpoint_io
    assert isinstance(io, AtomicCheckpointIO)
    evil = hostile_checkpoint(tmp_path / "evil.ckpt", marker)
    with pytest.raises(
        CheckpointError, match="(?i)refused to load.*unsupported global posix.system"
    ):
        io.load_checkpoint(evil, weights_only=False)
    with pytest.raises(CheckpointError, match="refused"):
        trainer.strategy.load_checkpoint(evil)


def _exported_lam(run: Path) -> Path:
    cfg = load_config(PretrainConfig, LAM_DEBUG)
    kwargs = {"in_channels": 3, "num_actions": 0, "action_dim": 0, "context": cfg.data.context}
    lam = LatentActionModel(cfg.model, **kwargs, sync_codebook=False)
    export_model(run, lam, kind="lam", config=to_dict(cfg), extra=kwargs)
    return run


def test_loaders_of_exported_models_refuse_a_pickle_in_place_of_safetensors(tmp_path, marker):
    lam_run = _exported_lam(tmp_path / "lam")
    load_lam(lam_run)  # the genuine export loads
    pcfg = load_config(PolicyConfig, None, {"policy": {"impala_scale": 1, "hidden": 16}})
    policy = LatentPolicy.for_lam(pcfg.policy, load_lam(lam_run))
    info = lam_info(read_lam(lam_run))
    pol_run = tmp_path / "policy"
    export_model(pol_run, policy, kind="policy", config=to_dict(pcfg),
                 extra=policy_extra(policy, info), name="policy")  # fmt: skip
    load_policy(pol_run)

    for run, name in ((lam_run, "model"), (pol_run, "policy")):
        hostile_checkpoint(run / f"{name}.safetensors", marker)
    with pytest.raises(CheckpointError, match="model.safetensors: not a safetensors file"):
        load_lam(lam_run)
    with pytest.raises(CheckpointError, match="policy.safetensors: not a safetensors file"):
        load_policy(pol_run)


@pytest.fixture(scope="module")
def bc_run(tmp_path_factory) -> tuple[Path, Path]:
    """A real `lapo finetune --method bc` run (no LAM needed) and its labelled data."""
    root = tmp_path_factory.mktemp("untrusted-ft")
    data = make_dataset(root / "data", shards=3, clip_frames=16).path
    cfg = load_config(FinetuneConfig, ROOT / "configs/finetune/debug.yaml",
                      ["method=bc", "label_budget=40", "epochs=2"])  # fmt: skip
    finetune(cfg, root / "run", data)
    return root / "run", data


def test_load_agent_refuses_a_pickle_in_place_of_safetensors(bc_run, tmp_path, marker):
    run = shutil.copytree(bc_run[0], tmp_path / "run")
    load_agent(run)
    hostile_checkpoint(run / "agent.safetensors", marker)
    with pytest.raises(AgentError, match="agent.safetensors: not a safetensors file"):
        load_agent(run)


@pytest.mark.parametrize("member", ["optimizer.bin", "random_states_0.pkl"])
def test_finetune_resume_never_runs_a_hostile_state_file(bc_run, tmp_path, marker, member):
    run, data = bc_run
    run = shutil.copytree(run, tmp_path / "run")
    for name in ("agent.safetensors", "agent.json", "metrics.json"):  # as if killed at the end
        (run / name).unlink()
    hostile_checkpoint(run / "checkpoints" / "bc" / "epoch-0001" / member, marker)
    cfg = load_config(FinetuneConfig, run / "config.yaml")
    if member == "optimizer.bin":
        with pytest.raises(CheckpointError, match="optimizer.bin|refused"):
            finetune(cfg, run, data, resume=True)
    else:  # Accelerate refuses it too (weights_only) and goes on without the generator state
        finetune(cfg, run, data, resume=True)


def test_export_refuses_a_hostile_checkpoint(tmp_path, marker, capsys):
    evil = hostile_checkpoint(tmp_path / "run" / "checkpoints" / "step-0000003.ckpt", marker)
    assert lapo_main(["export", "--run", str(evil), "--out", str(tmp_path / "out")]) == 2
    assert "refused to load" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


YAML_TAGS = [
    "trainer:\n  max_steps: !!python/object/apply:os.system ['touch {m}']\n",
    "!!python/object/new:subprocess.Popen [['touch', '{m}']]\n",
    "model: !!python/name:os.system\n",
]


@pytest.mark.parametrize("text", YAML_TAGS)
def test_yaml_with_python_tags_is_refused_by_name(tmp_path, marker, capsys, text):
    cfg = tmp_path / "evil.yaml"
    cfg.write_text(text.format(m=marker))
    with pytest.raises(ConfigError, match=r"evil\.yaml: refused: .*python/.*safe loader"):
        load_config(PretrainConfig, cfg)
    args = ["pretrain", "--config", str(cfg), "--data", str(tmp_path), "--out", str(tmp_path / "r")]
    assert lapo_main(args) == 2
    err = capsys.readouterr().err
    assert "refused" in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


def test_a_python_tag_in_a_set_override_is_refused_by_name(marker):
    tag = f"!!python/object/apply:os.system ['touch {marker}']"
    with pytest.raises(ConfigError, match=r"^trainer\.seed: refused: .*python/object/apply"):
        load_config(PretrainConfig, None, [f"trainer.seed={tag}"])


def test_safe_torch_load_reads_genuine_checkpoints(tmp_path):
    path = tmp_path / "ok.ckpt"
    torch.save({"global_step": 7, "state_dict": {"w": torch.ones(2)}, "cfg": {"a": [1, "b"]}}, path)
    assert safe_torch_load(path)["global_step"] == 7
    path.write_bytes(path.read_bytes()[:100])  # torn
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        safe_torch_load(path)
