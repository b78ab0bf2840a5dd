"""``lapo export``: weights as safetensors + JSON from any stage's run or checkpoint.

Real runs of all three stages on tiny real shards (stage 1 and 2 for two steps, stage 3
the bc baseline) are exported from their finished model, from a named checkpoint, from
the newest checkpoint of an unfinished run and from a checkpoint file, and each export
is loaded back, with torch.load and every unpickler made to fail, into weights equal to
the source's.
"""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lapo.checkpoint import state_dict_from_checkpoint
from lapo.cli import main as lapo_main
from lapo.config import FinetuneConfig, PretrainConfig, load_config
from lapo.finetune import finetune
from lapo.lam import pretrain
from lapo.policy import load_policy_config, train_policy
from lapo.runs import load_agent, load_lam, load_policy
from tests.datagen import make_dataset

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("export-data"), shards=3, clip_frames=16).path


@pytest.fixture(scope="module")
def lam_run(data, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("export-lam") / "run"
    overrides = [f"data.path={data}", "trainer.max_steps=4", "trainer.loggers=[]"]
    pretrain(load_config(PretrainConfig, ROOT / "configs/lam/debug.yaml", overrides), run)
    return run


@pytest.fixture(scope="module")
def policy_run(lam_run, data, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("export-policy") / "run"
    overrides = [f"lam={lam_run}", f"data.path={data}", "trainer.max_steps=2", "trainer.loggers=[]"]
    train_policy(load_policy_config(ROOT / "configs/policy/debug.yaml", overrides), run)
    return run


@pytest.fixture
def no_pickle(monkeypatch):
    """Any unpickling (torch.load included) fails from here on: loaders must not need it."""

    def refuse(*_a, **_k):
        raise AssertionError("an export must load without pickle")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)


def export(*args: str) -> None:
    assert lapo_main(["export", *args]) == 0


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_stage1_from_the_run_a_named_checkpoint_and_an_unfinished_run(lam_run, tmp_path, request):
    export("--run", str(lam_run), "--out", str(tmp_path / "final"))
    export("--run", str(lam_run), "--checkpoint", "step-0000002", "--out", str(tmp_path / "step2"))
    unfinished = shutil.copytree(lam_run, tmp_path / "unfinished")
    for name in ("model.safetensors", "model.json"):
        (unfinished / name).unlink()
    export("--run", str(unfinished), "--out", str(tmp_path / "newest"))
    ckpt = lam_run / "checkpoints" / "step-0000002.ckpt"
    export("--run", str(ckpt), "--out", str(tmp_path / "file"))

    last = state_dict_from_checkpoint(lam_run / "checkpoints" / "last.ckpt")  # step 4
    step2 = state_dict_from_checkpoint(ckpt)
    assert not same(last, step2)
    request.getfixturevalue("no_pickle")
    for out, want in (("final", last), ("step2", step2), ("newest", last), ("file", step2)):
        model = load_lam(tmp_path / out)  # safetensors + json only
        assert same(model.state_dict(), want), out
        assert same(load_file(tmp_path / out / "model.safetensors"), want), out


def test_stage2_from_the_run_and_from_a_checkpoint(policy_run, tmp_path, request):
    export("--run", str(policy_run), "--out", str(tmp_path / "final"))
    export("--run", str(policy_run), "--checkpoint", "last", "--out", str(tmp_path / "last"))
    want = state_dict_from_checkpoint(policy_run / "checkpoints" / "last.ckpt", prefix="policy.")
    request.getfixturevalue("no_pickle")
    for out in ("final", "last"):
        policy = load_policy(tmp_path / out)
        assert same(policy.state_dict(), want), out
    final = (policy_run / "policy.json").read_text()
    assert (tmp_path / "last" / "policy.json").read_text() == final  # same layout, same settings


def test_stage3_agent(data, tmp_path, request):
    cfg = load_config(
        FinetuneConfig,
        ROOT / "configs/finetune/debug.yaml",
        ["method=bc", "label_budget=40", "epochs=1"],
    )
    finetune(cfg, tmp_path / "run", data)
    export("--run", str(tmp_path / "run"), "--out", str(tmp_path / "out"))
    want = load_file(tmp_path / "run" / "agent.safetensors")
    request.getfixturevalue("no_pickle")
    agent = load_agent(tmp_path / "out")
    assert agent.method == "bc" and same(load_file(tmp_path / "out" / "agent.safetensors"), want)
    assert same({k: v for k, v in agent.state_dict().items() if k in want}, want)


def test_what_cannot_be_exported_is_a_clear_error(lam_run, tmp_path, capsys):
    cases = [
        (["--run", str(tmp_path / "missing")], "does not exist"),
        (["--run", str(tmp_path)], "neither a lapo run"),
        (["--run", str(lam_run), "--checkpoint", "step-9"], "step-9: not found"),
    ]
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {"w": torch.ones(1)}}, foreign)
    cases.append((["--run", str(foreign)], "not a checkpoint of lapo pretrain"))
    for args, message in cases:
        assert lapo_main(["export", *args, "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()
