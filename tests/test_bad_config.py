"""Impossible combinations of settings fail at start-up, naming the key, before any training.

Unknown keys and wrong types are `test_config`'s; the window inherited from the LAM and
``policy.target=codes`` on a continuous LAM are `test_policy`'s; the label budget and
``finetune_policy`` without a policy are `test_labelled` / `test_finetune`'s. This file
covers the rest, through the real ``lapo`` command (in this process): each case must
exit with status 2 and one line that names the key, without a traceback. Settings that
the YAML alone rules out are tried with a dataset that does not exist, so an error that
names the key proves the dataset was never opened; the ones that need the dataset
(window length, actions) are tried on real shards and must leave nothing trained.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lapo.cli import main as lapo_main
from lapo.config import ConfigError, ModelConfig, PretrainConfig, load_config
from lapo.models import LatentActionModel
from tests.datagen import make_dataset

ROOT = Path(__file__).resolve().parents[1]
DEBUG = str(ROOT / "configs/lam/debug.yaml")  # latent_dim 16, vq_heads 2, image_size 32, cpu


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Three shards of 16-frame clips, 5 discrete actions."""
    return make_dataset(tmp_path_factory.mktemp("badcfg"), shards=3, clip_frames=16).path


@pytest.fixture(scope="module")
def unlabelled(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("badcfg-none"), shards=3, actions=None).path


@pytest.fixture(autouse=True)
def no_launcher(monkeypatch):
    for var in ("SLURM_JOB_ID", "SLURM_NTASKS", "NODE_RANK", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(var, raising=False)


def fails(capsys, args: list[str], key: str) -> str:
    assert lapo_main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert f"error: {key}" in err or f": {key}" in err, err
    return err


YAML_ONLY = [
    (["model.vq_heads=3"], "model.vq_heads"),  # 16 is not divisible by 3
    (["model.image_size=40"], "model.image_size"),  # the U-Net halves four times
    (["model.encoder=transformer", "model.patch_size=12"], "model.patch_size"),
    (["model.encoder=transformer", "model.tf_dim=30", "model.tf_heads=4"], "model.tf_heads"),
    (["trainer.keep_checkpoints=-2"], "trainer.keep_checkpoints"),  # -1 is "all"
    (["trainer.num_nodes=2"], "trainer.num_nodes"),  # no srun / torchrun to start the others
    (["data.val_fraction=1"], "data.val_fraction"),  # nothing left to train on
]
if not torch.cuda.is_available():
    YAML_ONLY.append((["trainer.accelerator=gpu"], "trainer.accelerator"))


@pytest.mark.parametrize(("overrides", "key"), YAML_ONLY)
def test_impossible_settings_fail_before_the_dataset_is_opened(tmp_path, capsys, overrides, key):
    run = tmp_path / "run"
    missing = tmp_path / "no-such-dataset"
    args = ["pretrain", "--config", DEBUG, "--data", str(missing), "--out", str(run), "--set"]
    err = fails(capsys, [*args, *overrides], key)
    assert "no-such-dataset" not in err
    assert not (run / "checkpoints").exists()


def test_the_same_settings_with_the_latent_world_model_are_fine():
    # image_size only has to be a multiple of 16 for the pixel world model
    cfg = load_config(PretrainConfig, DEBUG, ["model.image_size=40", "model.fdm=latent"])
    assert cfg.model.image_size == 40
    with pytest.raises(ConfigError, match="^model.image_size: the pixel world model"):
        load_config(PretrainConfig, DEBUG, ["model.image_size=40"])


DATA_DEPENDENT = [
    ("data", ["data.context=20"], "data.path: data.context=20"),  # windows of 21 > 16-frame clips
    ("data", ["data.context=8", "data.frame_gap=2"], "data.path: data.context=8"),
    ("data", ["model.num_actions=3"], "model.num_actions"),  # the data has 5 actions
    ("unlabelled", ["model.sup_weight=0.5"], "model.sup_weight"),  # nothing to supervise with
]


@pytest.mark.parametrize(("which", "overrides", "key"), DATA_DEPENDENT)
def test_settings_the_dataset_rules_out_fail_before_training(
    request, tmp_path, capsys, which, overrides, key
):
    dataset = request.getfixturevalue(which)
    run = tmp_path / "run"
    args = ["pretrain", "--config", DEBUG, "--data", str(dataset), "--out", str(run), "--set"]
    fails(capsys, [*args, *overrides], key)
    assert not (run / "checkpoints").exists() and not (run / "logs").exists()


@pytest.mark.parametrize(
    ("latent_dim", "levels"), [(16, [8, 5, 5, 5]), (3, [4, 4, 4, 4, 4]), (7, [2])]
)
def test_fsq_levels_cannot_mismatch_the_latent_size(latent_dim, levels):
    """FSQ projects latent_dim -> len(levels) -> latent_dim, so any pair is valid by construction."""
    cfg = ModelConfig(
        image_size=32, impala_scale=1, embed_dim=16, fdm_channels=4,
        latent_dim=latent_dim, bottleneck="fsq", fsq_levels=levels,
    )  # fmt: skip
    model = LatentActionModel(cfg, context=1).eval()
    frames = torch.randint(0, 256, (3, 2, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        out = model.encode(frames)
    assert out["latent"].shape == (3, latent_dim)
    codes = out["codes"]  # (B, 1) indices into the product of the levels
    assert codes.shape == (3, 1) and 0 <= int(codes.min()) and int(codes.max()) < model.num_codes
    assert model.num_codes == int(torch.tensor(levels).prod())
