"""Stage 1 end to end: `lapo pretrain` on real recorded Procgen frames.

Covers the run directory (checkpoints, logs, images, config, export), resume,
seeded determinism, the NaN policy and the signal handling.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lapo.checkpoint import CheckpointError, checkpoint_step, state_dict_from_checkpoint
from lapo.config import PretrainConfig, load_config, read_yaml
from lapo.errors import NonFiniteLossError
from lapo.lam import LAMModule, load_label_budget, pretrain
from lapo.runs import load_lam
from lapo.train import fit
from lapo.windows import DatasetError
from tests.datagen import make_dataset

ROOT = Path(__file__).resolve().parents[1]
DEBUG = ROOT / "configs" / "lam" / "debug.yaml"
LAPO = [sys.executable, "-m", "lapo.cli"]


@pytest.fixture(scope="session")
def procgen_data(tmp_path_factory) -> Path:
    """Four short random-policy Bigfish episodes, one shard each (3 train + 1 val)."""
    from lapo.record import record_dataset

    out = tmp_path_factory.mktemp("bigfish")
    record_dataset(
        "procgen:bigfish",
        out,
        episodes=4,
        size=32,
        clip_frames=16,
        episodes_per_shard=1,
        max_episode_steps=30,
        progress=False,
        verbose=False,
    )
    return out


def debug_cfg(data: Path, *overrides: str) -> PretrainConfig:
    return load_config(PretrainConfig, DEBUG, [f"data.path={data}", *overrides])


def run_cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([*LAPO, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_cli_end_to_end_writes_the_run_directory(procgen_data, tmp_path):
    run = tmp_path / "run"
    res = run_cli(
        "pretrain", "--config", str(DEBUG), "--data", str(procgen_data), "--out", str(run),
        "--set", "trainer.max_steps=4", "optim.lr=2e-3",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert "finished at step 4" in res.stdout

    # resolved config: the YAML plus the overrides, readable back into the dataclass
    cfg = load_config(PretrainConfig, run / "config.yaml")
    assert cfg.data.path == str(procgen_data) and cfg.optim.lr == 2e-3
    assert cfg.model.image_size == read_yaml(DEBUG)["model"]["image_size"]

    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["best.ckpt", "last.ckpt", "step-0000002.ckpt", "step-0000004.ckpt"]
    assert checkpoint_step(run / "checkpoints" / "last.ckpt") == 4
    assert not list(run.rglob("*.tmp")), "atomic writes left temporary files behind"

    metrics_csv = next((run / "logs" / "csv").rglob("metrics.csv")).read_text()
    assert "train/loss" in metrics_csv and "val/psnr" in metrics_csv
    assert list((run / "logs" / "tensorboard").rglob("events.out.tfevents.*"))
    assert (run / "images" / "train-step0000002.png").is_file()
    # the trained model's own picture, on held-out windows, named with the last step
    assert (run / "images" / "final-val-step0000004.png").is_file()

    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["global_step"] == 4 and metrics["finished"] is True
    for key in ("train/loss", "train/psnr", "train/psnr_copy", "val/codebook_perplexity"):
        assert key in metrics, key
    # the val shard carries Procgen's actions, so the online probe ran
    assert metrics["val/probe_n"] >= 20
    assert 0.0 <= metrics["val/probe_acc"] <= 1.0 and 0.0 <= metrics["val/probe_majority"] <= 1.0

    # the export equals the final checkpoint and loads without Lightning or pickle
    exported = load_file(run / "model.safetensors")
    ckpt = state_dict_from_checkpoint(run / "checkpoints" / "last.ckpt")
    assert exported.keys() == ckpt.keys()
    assert all(torch.equal(exported[k], ckpt[k]) for k in ckpt)
    model = load_lam(run)
    assert not model.training
    frames = torch.randint(0, 256, (2, cfg.data.context + 1, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        out = model.encode(frames)
    assert out["latent"].shape == (2, cfg.model.latent_dim)


def test_resume_continues_from_the_saved_step(procgen_data, tmp_path):
    run = tmp_path / "run"
    first = pretrain(debug_cfg(procgen_data, "trainer.max_steps=4"), run)
    assert first["global_step"] == 4
    at4 = state_dict_from_checkpoint(run / "checkpoints" / "last.ckpt")

    second = pretrain(debug_cfg(procgen_data, "trainer.max_steps=8"), run, resume=True)
    assert second["global_step"] == 8 and second["finished"] is True
    assert checkpoint_step(run / "checkpoints" / "last.ckpt") == 8
    assert checkpoint_step(run / "checkpoints" / "step-0000006.ckpt") == 6
    at8 = state_dict_from_checkpoint(run / "checkpoints" / "last.ckpt")
    assert any(not torch.equal(at4[k], at8[k]) for k in at4), "training did not go on"
    # the resumed run logged only the new steps, in a new log version
    resumed_csv = (run / "logs" / "csv" / "version_1" / "metrics.csv").read_text().splitlines()
    header = resumed_csv[0].split(",")
    steps = {int(row.split(",")[header.index("step")]) for row in resumed_csv[1:]}
    assert steps and min(steps) >= 4 and max(steps) <= 8


def logged(run: Path, key: str, version: int = 0) -> list[tuple[int, float]]:
    """(step, value) of every row of the run's CSV log that holds `key`."""
    rows = (run / "logs" / "csv" / f"version_{version}" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    out = []
    for row in rows[1:]:
        cells = row.split(",")
        if cells[header.index(key)]:
            out.append((int(cells[header.index("step")]), float(cells[header.index(key)])))
    return out


def test_a_time_budget_ends_the_run_finished_validated_and_annealed(
    procgen_data, tmp_path, monkeypatch
):
    """trainer.max_minutes: the run stops on the clock long before max_steps, as a finished
    run (last validation, export), with the cosine schedule run down by the clock."""
    import lightning.pytorch.callbacks.timer as timer_module

    class Clock:  # every reading of the clock is half a second later: no machine is too slow
        now = 0.0

        def monotonic(self) -> float:
            self.now += 0.5
            return self.now

    monkeypatch.setattr(timer_module, "time", Clock())
    run = tmp_path / "run"
    cfg = debug_cfg(procgen_data, "trainer.max_steps=100000", "trainer.max_minutes=0.2",
                    "trainer.val_every_n_steps=1000", "trainer.ckpt_every_n_steps=1000")  # fmt: skip
    m = pretrain(cfg, run)
    steps = m["global_step"]
    assert m["finished"] is True and 2 <= steps < 1000, m
    assert (run / "model.safetensors").exists(), "a run ended by its budget is exported"
    assert m["health"]["step"] == steps, "no validation pass at the step the clock stopped"
    assert "val/psnr" in m or "val/loss" in m, sorted(m)
    lrs = logged(run, "train/lr")
    # by steps alone the schedule would still be at its peak (1e-3); the clock ran it down
    assert lrs[-1][1] < 0.5e-3, lrs[-5:]

    # the clock travels in the checkpoint: more minutes go on from the time spent
    more = pretrain(debug_cfg(procgen_data, "trainer.max_steps=100000", "trainer.max_minutes=0.4",
                              "trainer.val_every_n_steps=1000", "trainer.ckpt_every_n_steps=1000"),
                    run, resume=True)  # fmt: skip
    assert more["finished"] is True and more["global_step"] > steps
    lrs = logged(run, "train/lr", version=1)
    assert lrs[0][1] < 1e-3 * 0.9, "the resumed schedule started over instead of going on"


def test_a_label_budget_supervises_stage_1_with_finetunes_transitions(procgen_data, tmp_path):
    """data.labeled: stage 1's head sees exactly the transitions `lapo finetune` would pick."""
    from lapo.labelled import scan_labelled, select_budget

    cfg = debug_cfg(
        procgen_data, "trainer.max_steps=3", "trainer.loggers=[]", "model.sup_weight=1.0",
        f"data.labeled={procgen_data}", "data.label_budget=20", "data.label_batch_size=4",
        "data.label_seed=3",
    )  # fmt: skip
    metrics = pretrain(cfg, tmp_path / "run")
    assert metrics["finished"] and "train/sup_loss" in metrics
    labelled, space = load_label_budget(cfg)
    assert space["type"] == "discrete" and len(labelled) == 20
    index = scan_labelled(procgen_data, context=cfg.data.context)
    sel = select_budget(index, 20, 3, 0.2)
    assert sorted(labelled.ids) == sorted((e, int(t)) for e, r in sel.train.items() for t in r)


def test_a_label_budget_needs_the_supervised_head(procgen_data):
    from lapo.config import ConfigError

    with pytest.raises(ConfigError, match="data.labeled.*model.sup_weight"):
        debug_cfg(procgen_data, f"data.labeled={procgen_data}")


def test_resume_without_a_checkpoint_fails_before_reading_data(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        pretrain(debug_cfg(tmp_path / "no-such-dataset"), tmp_path / "run", resume=True)


def test_a_missing_dataset_fails_before_writing_the_run(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(DatasetError, match="does not exist"):
        pretrain(debug_cfg(tmp_path / "no-such-dataset"), run)
    assert not run.exists(), "a failed command left files behind"


def test_one_shard_trains_both_stages_with_the_default_hold_out(tmp_path):
    """One shard of four source videos: data.val_shards=1 (the default) holds out a video."""
    from lapo.policy import load_policy_config, train_policy

    data = make_dataset(
        tmp_path / "data", shards=1, clips_per_shard=8, sources_per_shard=4, clip_frames=16
    ).path
    lam = pretrain(debug_cfg(data, "trainer.loggers=[]"), tmp_path / "lam")
    assert lam["finished"] and "val/loss" in lam
    cfg = load_policy_config(
        ROOT / "configs" / "policy" / "debug.yaml",
        [f"lam={tmp_path / 'lam'}", f"data.path={data}", "trainer.loggers=[]"],
    )
    policy = train_policy(cfg, tmp_path / "policy")
    assert policy["finished"] and any(k.startswith("val/") for k in policy)


def test_two_seeded_runs_are_identical_and_the_seed_matters(procgen_data, tmp_path):
    a = tmp_path / "a"
    b = tmp_path / "b"
    c = tmp_path / "c"
    pretrain(debug_cfg(procgen_data), a)
    pretrain(debug_cfg(procgen_data), b)
    pretrain(debug_cfg(procgen_data, "trainer.seed=1"), c)
    wa, wb, wc = (load_file(r / "model.safetensors") for r in (a, b, c))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)


def _poisoned_module(cfg: PretrainConfig) -> LAMModule:
    """A real LAM whose world model emits NaN: every loss is non-finite."""
    module = LAMModule(cfg, num_actions=15)
    with torch.no_grad():
        next(module.model.fdm.parameters()).fill_(float("nan"))
    return module


def test_nan_policy_skip_counts_and_keeps_weights(procgen_data, tmp_path):
    from lapo.data import VideoDataModule

    cfg = debug_cfg(procgen_data, "trainer.nan_policy=skip", "trainer.max_steps=3")
    module = _poisoned_module(cfg)
    idm_before = {k: v.clone() for k, v in module.model.idm.state_dict().items()}
    result = fit(module, VideoDataModule(cfg.data), cfg.trainer, tmp_path / "run")
    assert result.trainer.global_step == 3 and module.nonfinite_steps == 3
    # skipped steps ran no backward: the IDM is untouched
    assert all(torch.equal(v, module.model.idm.state_dict()[k]) for k, v in idm_before.items())


def test_nan_policy_stop_names_step_and_keys(procgen_data, tmp_path):
    from lapo.data import VideoDataModule

    cfg = debug_cfg(procgen_data, "trainer.nan_policy=stop")
    with pytest.raises(NonFiniteLossError, match=r"step 0, batch 0, keys \['.+__c\d{5}'"):
        fit(_poisoned_module(cfg), VideoDataModule(cfg.data), cfg.trainer, tmp_path / "run")


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_saves_last_checkpoint_and_exits_cleanly(procgen_data, tmp_path, signum):
    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.Popen(
        [*LAPO, "pretrain", "--config", str(DEBUG), "--data", str(procgen_data), "--out", str(run),
         "--set", "trainer.max_steps=100000", "trainer.val_every_n_steps=100000"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env,
    )  # fmt: skip
    try:
        deadline = time.time() + 180
        while not (run / "checkpoints" / "step-0000002.ckpt").exists():
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.time() < deadline, "training never reached step 2"
            time.sleep(0.2)
        proc.send_signal(signum)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:]
    assert "stopped" in out and "--resume" in out
    step = checkpoint_step(run / "checkpoints" / "last.ckpt")
    assert 2 <= step < 100000
    assert not (run / "model.safetensors").exists(), "an unfinished run must not export a model"
