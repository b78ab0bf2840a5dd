"""configs/lam/procgen.yaml is the LAPO paper's scale: IDM and world model within 10% of the
paper's parameters and forward FLOPs at 64x64 with context 2, and its comments say so."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from lapo.config import PretrainConfig, load_config
from lapo.models import LatentActionModel

ROOT = Path(__file__).resolve().parents[1]
PROCGEN = ROOT / "configs" / "lam" / "procgen.yaml"

# Source: github.com/schmidtdominik/LAPO, lapo/models.py and lapo/utils.py
# (create_dynamics_models), built with lapo/config.yaml (idm_impala_scale 4, wm_scale 24,
# la_dim 2 x 4 x 16 = 128) for 64x64 RGB frames and ADD_TIME_HORIZON = 1: the IDM sees 3
# frames, the world model 2. FLOPs: torch.utils.flop_counter.FlopCounterMode, one window
# (batch 1), forward only (it counts a multiply-add as 2).
LAPO_IDM_PARAMS = 3_685_376  # IDM(vq_config, (9, 64, 64), 128, impala_scale=4)
LAPO_IDM_FLOPS = 952_696_832
LAPO_WM_PARAMS = 7_814_139  # WorldModel(128, in_depth=6, out_depth=3, base_size=24)
LAPO_WM_FLOPS = 759_496_704
TOLERANCE = 0.10


def forward_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.fixture(scope="module")
def sizes() -> dict[str, int]:
    cfg = load_config(PretrainConfig, PROCGEN)
    assert (cfg.model.image_size, cfg.data.context) == (64, 2)
    torch.manual_seed(0)
    model = LatentActionModel(cfg.model, context=cfg.data.context).eval()
    window = torch.rand(1, 3, 3, 64, 64)  # (B, k+1, C, S, S) in [0, 1]
    latent = torch.randn(1, cfg.model.latent_dim)  # (B, D)
    with torch.no_grad():
        return {
            "idm_params": sum(p.numel() for p in model.idm.parameters()),
            "idm_flops": forward_flops(lambda: model.idm(window)),
            "wm_params": sum(p.numel() for p in model.fdm.parameters()),
            "wm_flops": forward_flops(lambda: model.fdm(window[:, :-1], latent)),
        }


@pytest.mark.parametrize(
    ("key", "reference"),
    [
        ("idm_params", LAPO_IDM_PARAMS),
        ("idm_flops", LAPO_IDM_FLOPS),
        ("wm_params", LAPO_WM_PARAMS),
        ("wm_flops", LAPO_WM_FLOPS),
    ],
)
def test_procgen_config_is_within_ten_percent_of_lapo(sizes, key, reference):
    ratio = sizes[key] / reference
    assert abs(ratio - 1) <= TOLERANCE, f"{key}: {sizes[key]:,} against LAPO's {reference:,}"


def test_the_config_comments_state_the_measured_sizes(sizes):
    text = PROCGEN.read_text()
    for name in ("idm", "wm"):
        assert f"{sizes[f'{name}_params']:,} parameters" in text, name
        assert f"{sizes[f'{name}_flops'] / 1e9:.2f} GFLOP forward" in text, name
    assert f"{LAPO_WM_PARAMS:,}" in text and f"{LAPO_WM_FLOPS / 1e9:.2f} GFLOP" in text


# --------------------------------------------------------------------------- model.fdm_mults


def test_default_levels_keep_the_world_model_of_other_configs():
    cfg = load_config(PretrainConfig, ROOT / "configs" / "lam" / "debug.yaml")
    assert cfg.model.fdm_mults == [1, 2, 4, 8]
    model = LatentActionModel(cfg.model, context=cfg.data.context)
    assert sum(p.numel() for p in model.fdm.parameters()) == 542_763  # as before fdm_mults


def test_fdm_mults_set_the_levels_and_the_frame_size_they_need():
    from lapo.config import ConfigError, ModelConfig
    from lapo.models import UNetFDM

    fdm = UNetFDM(context=2, latent_dim=8, image_size=8, channels=8, mults=[1, 3])
    assert len(fdm.down_blocks) == 2 and fdm.down_blocks[-1].conv2.out_channels == 24
    out = fdm(torch.rand(2, 2, 3, 8, 8), torch.randn(2, 8))  # (B, k, C, S, S), (B, D)
    assert out.shape == (2, 3, 8, 8)
    with pytest.raises(ConfigError, match=r"^model.image_size: .*6 halvings.* multiple of 64"):
        ModelConfig(image_size=96, fdm_mults=[1, 1, 2, 5, 8, 8])
    ModelConfig(image_size=96, fdm_mults=[1, 1, 2, 5, 8, 8], fdm="latent")  # no U-Net
    for bad in ([], [1, 0]):
        with pytest.raises(ConfigError, match="^model.fdm_mults"):
            ModelConfig(fdm_mults=bad)
    with pytest.raises(ValueError, match="one value per group"):  # 1x1 with one channel a group
        UNetFDM(context=1, latent_dim=4, image_size=16, channels=1, mults=[1, 1, 1, 1])
