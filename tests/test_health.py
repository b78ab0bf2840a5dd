"""Stage-1 health checks (lapo/health.py): the verdict logic, the model's latent-dependence
measurement, and `lapo pretrain` writing the verdict, including for a world model that
cannot see its latent action."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from lapo.config import PretrainConfig, load_config
from lapo.health import (
    THRESHOLDS,
    HealthThresholds,
    assess,
    assess_policy,
    codebook_churn,
    latent_gain_db,
    latent_spread,
    warning_text,
)
from lapo.lam import pretrain
from lapo.models import LatentActionModel, psnr
from lapo.probe import fit_probe, split_indices
from tests.datagen import make_dataset
from tests.test_models import sprite_windows, tiny_cfg

ROOT = Path(__file__).resolve().parents[1]
DEBUG = ROOT / "configs" / "lam" / "debug.yaml"

HEALTHY = {
    "val/psnr": 35.3,
    "val/psnr_copy": 13.9,
    "val/codebook_perplexity": 5.2,
    "val/latent_spread": 0.6,
    "val/latent_gain_db": 9.0,
    "val/probe_acc": 0.70,
    "val/probe_majority": 0.48,
    "val/probe_n": 2000.0,
}


def blind(model: LatentActionModel) -> LatentActionModel:
    """Cut the pixel world model off from z[t]: both of its latent inputs are zero and frozen."""
    for layer in (model.fdm.z_in, model.fdm.z_mid):
        torch.nn.init.zeros_(layer.weight)
        layer.weight.requires_grad_(False)
    return model


class BlindLAM(LatentActionModel):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        blind(self)


# --------------------------------------------------------------------------- verdict logic


def test_a_healthy_run_passes_every_check():
    health = assess(HEALTHY)
    assert health["verdict"] == "pass" and health["failed"] == []
    assert set(health["checks"]) == {
        "beats_copy", "codes_used", "latent_spread", "latent_used", "probe",
    }  # fmt: skip
    assert all(c["passed"] for c in health["checks"].values())
    assert health["checks"]["beats_copy"]["value"] == pytest.approx(21.4)
    assert health["checks"]["probe"]["value"] == pytest.approx(0.22)
    assert health["thresholds"]["min_latent_gain_db"] == THRESHOLDS.min_latent_gain_db
    json.dumps(health)  # goes into metrics.json as is


def test_beating_copy_is_not_enough():
    """The sticky-random Procgen case: +5.7 dB over copy, yet the latent carries nothing."""
    m = {
        **HEALTHY,
        "val/psnr": 30.7,
        "val/psnr_copy": 25.0,
        "val/codebook_perplexity": 3.0,
        "val/latent_gain_db": 0.004,
        "val/probe_acc": 0.078,
        "val/probe_majority": 0.118,
    }
    health = assess(m)
    assert health["verdict"] == "fail"
    assert health["failed"] == ["latent_used", "probe"]
    assert health["checks"]["beats_copy"]["passed"] is True
    text = warning_text(health, step=1200)
    assert "FAILED" in text and "step 1200" in text and "2 of 5 checks" in text
    assert "latent_used" in text and "probe" in text and "beats_copy" not in text
    assert text.count("try:") == 2


def test_a_latent_failure_on_mostly_still_video_names_still_keep():
    m = {**HEALTHY, "val/latent_gain_db": 0.01, "val/still_share": 0.72}
    health = assess(m)
    assert health["failed"] == ["latent_used"] and health["still_share"] == pytest.approx(0.72)
    text = warning_text(health, step=100)
    assert "72% of the validation windows are still" in text and "data.still_keep" in text
    # moving video, or a failure the still windows do not explain: no note
    assert "still_keep" not in warning_text(assess({**m, "val/still_share": 0.2}), step=100)
    assert "still_keep" not in warning_text(assess({**m, **{"val/psnr": 14.0,
        "val/latent_gain_db": 9.0}}), step=100)  # fmt: skip


@pytest.mark.parametrize(
    ("changes", "fails"),
    [
        ({"val/psnr": 14.0}, "beats_copy"),
        ({"val/codebook_perplexity": 1.0}, "codes_used"),
        ({"val/latent_spread": 5e-4}, "latent_spread"),
        ({"val/latent_gain_db": 0.0}, "latent_used"),
        ({"val/probe_acc": 0.48}, "probe"),
    ],
)
def test_each_check_fails_alone(changes, fails):
    assert assess({**HEALTHY, **changes})["failed"] == [fails]


def test_a_value_at_its_threshold_passes():
    t = HealthThresholds()
    at = {**HEALTHY, "val/latent_gain_db": t.min_latent_gain_db}
    assert assess(at, t)["checks"]["latent_used"]["passed"] is True
    stricter = HealthThresholds(min_latent_gain_db=10.0)
    assert assess(HEALTHY, stricter)["failed"] == ["latent_used"]


def test_missing_metrics_are_skipped_not_failed():
    # continuous bottleneck, unlabelled val data, latent world model: three checks remain
    m = {"val/latent_spread": 0.3, "val/latent_gain_db": 1.0}
    health = assess(m)
    assert health["verdict"] == "pass"
    for name in ("beats_copy", "codes_used", "probe"):
        assert health["checks"][name]["passed"] is None
        assert "not measured" in health["checks"][name]["skipped"]
    assert assess({})["verdict"] == "unknown"
    assert assess({"val/latent_gain_db": float("nan")})["verdict"] == "unknown"


def test_a_probe_on_few_windows_is_not_judged():
    health = assess({**HEALTHY, "val/probe_acc": 0.0, "val/probe_n": 40.0})
    assert health["verdict"] == "pass"
    assert "40 labelled" in health["checks"]["probe"]["skipped"]


def test_continuous_actions_use_the_variance_explained():
    m = {k: v for k, v in HEALTHY.items() if not k.startswith("val/probe")}
    good = assess({**m, "val/probe_mse": 0.2, "val/probe_mse_mean": 1.0, "val/probe_n": 500.0})
    assert good["checks"]["probe"]["value"] == pytest.approx(0.8) and good["verdict"] == "pass"
    bad = assess({**m, "val/probe_mse": 0.99, "val/probe_mse_mean": 1.0, "val/probe_n": 500.0})
    assert bad["failed"] == ["probe"]
    assert bad["checks"]["probe"]["threshold"] == THRESHOLDS.min_probe_r2


def test_latent_gain_in_db_for_both_world_models():
    assert latent_gain_db({"psnr": 30.0, "psnr_shuffled": 27.5}) == pytest.approx(2.5)
    assert latent_gain_db({"psnr": 30.0, "psnr_zeroed": 20.0}, "_zeroed") == pytest.approx(10.0)
    # latent world model: its loss ten times higher with a shuffled latent is 10 dB
    assert latent_gain_db({"fdm_loss": 0.01, "fdm_loss_shuffled": 0.1}) == pytest.approx(10.0)
    assert latent_gain_db({"fdm_loss": 0.1, "fdm_loss_shuffled": 0.1}) == pytest.approx(0.0)
    # pixel world model: pooled squared errors, the same ratio
    assert latent_gain_db({"mse": 0.001, "mse_zeroed": 0.01}, "_zeroed") == pytest.approx(10.0)
    assert latent_gain_db({"loss": 1.0}) is None


def test_a_policy_no_better_than_the_mean_latent_fails_stage_2():
    demo = assess_policy({"val/latent_mse": 0.0184, "val/latent_mse_baseline": 0.0292})
    assert demo["verdict"] == "pass"
    assert demo["checks"]["predicts_latent"]["value"] == pytest.approx(0.37, abs=0.01)
    random_video = assess_policy({"val/latent_mse": 0.1066, "val/latent_mse_baseline": 0.0885})
    assert random_video["verdict"] == "fail" and random_video["failed"] == ["predicts_latent"]
    text = warning_text(random_video, step=2000, final=True, command="lapo train-policy",
                        stage="stage-2")  # fmt: skip
    assert text.startswith(
        "lapo train-policy: stage-2 health check FAILED (final model, step 2000)"
    )
    assert "no better than always answering the mean latent" in text
    assert assess_policy({"val/loss": 1.0})["verdict"] == "unknown"


def test_copying_does_not_win_on_the_frames_it_copies_exactly():
    """Half the windows still (copy exact), half moving (copy off by 0.1 everywhere); the
    model off by 0.01 everywhere. A mean of per-image PSNRs would give copying 60 dB to the
    model's 40; pooled, the model's error is 50x smaller."""
    target = torch.full((4, 3, 8, 8), 0.5)
    copy = target.clone()
    copy[2:] += 0.1
    model = target + 0.01
    assert float(psnr(copy, target)) == pytest.approx(10 * math.log10(1 / 0.005), rel=1e-4)
    assert float(psnr(model, target)) == pytest.approx(40.0, rel=1e-4)
    assert float(psnr(model, target)) - float(psnr(copy, target)) > 15.0


def test_latent_spread_sees_a_collapse_behind_a_large_offset():
    g = torch.Generator().manual_seed(0)
    spread = torch.randn(4000, 8, generator=g, dtype=torch.float64)  # (N, D) std 1
    collapsed = 100.0 + 1e-4 * spread  # one latent for every window, far from zero
    for z, expected in ((spread, 1.0), (collapsed, 1e-6)):
        value = latent_spread(z.sum(0), z.pow(2).sum(0), z.shape[0])
        assert value == pytest.approx(expected, rel=0.1)
    assert math.isnan(latent_spread(torch.zeros(8), torch.zeros(8), 1))
    assert latent_spread(torch.zeros(8), torch.zeros(8), 10) == 0.0


# --------------------------------------------------------------------------- the measurement


@pytest.mark.parametrize("fdm", ["pixel", "latent"])
def test_a_world_model_that_cannot_see_the_latent_is_flagged(fdm):
    torch.manual_seed(0)
    cfg = tiny_cfg(bottleneck="continuous", fdm=fdm)  # a distinct latent for every window
    frames, _ = sprite_windows(16)
    model = LatentActionModel(cfg, context=2).eval()
    if fdm == "latent":  # the latent world model's predictor reads [features, z]: cut z out
        first = model.fdm.predictor[0]
        with torch.no_grad():
            first.weight[:, cfg.embed_dim :] = 0.0
    seeing = model.latent_dependence(frames, model.encode(frames)["latent"])
    if fdm == "pixel":
        blind(model)
    blinded = model.latent_dependence(frames, model.encode(frames)["latent"])
    key = "mse" if fdm == "pixel" else "fdm_loss"
    assert set(blinded) == {key, f"{key}_shuffled", f"{key}_zeroed"}

    gain = latent_gain_db({k: float(v) for k, v in blinded.items()})
    assert gain == 0.0
    health = assess({"latent_gain_db": gain}, prefix="")
    assert health["failed"] == ["latent_used"]
    if fdm == "pixel":  # the same model before blinding does respond to its latent
        assert float(seeing["mse"]) != float(seeing["mse_shuffled"])


def test_the_shuffle_gives_no_window_its_own_latent():
    model = LatentActionModel(tiny_cfg(), context=2).eval()
    frames, _ = sprite_windows(6)
    latent = torch.arange(6.0)[:, None].expand(6, 16).contiguous()  # (B, D): row i is i
    seen = []
    model.fdm.forward = lambda ctx, z: seen.append(z[:, 0].clone()) or ctx[:, -1]
    model.latent_dependence(frames, latent, seed=3)
    true, shuffled, zeroed = seen
    assert torch.equal(true, torch.arange(6.0)) and not torch.any(zeroed)
    assert sorted(shuffled.tolist()) == list(range(6))  # a permutation ...
    assert not torch.any(shuffled == true)  # ... with no fixed point


# --------------------------------------------------------------------------- lapo pretrain


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("health"), shards=3, clips_per_shard=3).path


def debug_cfg(data: Path, *overrides: str) -> PretrainConfig:
    return load_config(
        PretrainConfig, DEBUG, [f"data.path={data}", "trainer.loggers=[]", *overrides]
    )


def test_pretrain_writes_the_health_verdict(data, tmp_path):
    metrics = pretrain(debug_cfg(data), tmp_path / "run")
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    health = written["health"]
    assert health == json.loads(json.dumps(metrics["health"]))
    assert health["verdict"] in ("pass", "fail") and health["step"] == 4
    assert set(health["checks"]) == {
        "beats_copy", "codes_used", "latent_spread", "latent_used", "probe",
    }  # fmt: skip
    for key in ("val/latent_gain_db", "val/latent_zero_gain_db", "val/psnr_shuffled",
                "val/latent_spread", "val/health_failed", "val/still_share"):  # fmt: skip
        assert key in written, key
    latent_used = health["checks"]["latent_used"]
    assert latent_used["value"] == pytest.approx(written["val/latent_gain_db"])
    assert written["val/health_failed"] == len(health["failed"])
    assert 0.0 <= written["val/still_share"] < 0.5  # the test video's square always moves


def test_pretrain_flags_a_world_model_blind_to_the_latent(data, tmp_path, monkeypatch):
    monkeypatch.setattr("lapo.lam.LatentActionModel", BlindLAM)
    with pytest.warns(UserWarning, match="health check FAILED") as caught:
        metrics = pretrain(debug_cfg(data), tmp_path / "run")
    health = metrics["health"]
    assert health["verdict"] == "fail" and "latent_used" in health["failed"]
    assert health["checks"]["latent_used"]["value"] == 0.0
    texts = [str(w.message) for w in caught if "health check" in str(w.message)]
    # the validation pass at step 4 (past the warm-up) prints the block ...
    assert sum("FAILED (validation, step 4)" in t for t in texts) == 1
    # ... and the final verdict, of the same pass, points back to it
    assert sum("final model: fail (" in t and "latent_used" in t for t in texts) == 1


def test_validation_before_the_warm_up_does_not_warn(data, tmp_path, monkeypatch):
    monkeypatch.setattr("lapo.lam.LatentActionModel", BlindLAM)
    cfg = debug_cfg(data, "trainer.max_steps=6", "trainer.val_every_n_steps=1")
    with pytest.warns(UserWarning, match="health check") as caught:
        pretrain(cfg, tmp_path / "run")
    warned = [str(w.message) for w in caught if "FAILED (validation" in str(w.message)]
    first = math.ceil(THRESHOLDS.warmup_fraction * 6)  # steps are counted after the update
    assert [int(t.split("step ")[1].split(")")[0]) for t in warned] == list(range(first, 7))


def test_codebook_churn_is_named_where_even_use_falls_below_the_dead_code_threshold():
    from lapo.config import ModelConfig

    # the procgen_cpu case of old: 64 codes, batch 32, threshold 1 -> 0.5 uses per code
    churn = codebook_churn(ModelConfig(vq_codebook_size=64, vq_dead_code_threshold=1.0), 32)
    assert churn and "vq_dead_code_threshold=1" in churn and "0.12" in churn
    # more windows a step (a larger batch, or eight ranks) make the same rule safe
    assert codebook_churn(ModelConfig(vq_codebook_size=64, vq_dead_code_threshold=1.0), 256) is None
    assert codebook_churn(ModelConfig(vq_codebook_size=64, vq_dead_code_threshold=0.1), 32) is None
    assert codebook_churn(ModelConfig(vq_codebook_size=64, vq_dead_code_threshold=0.0), 4) is None
    assert codebook_churn(ModelConfig(bottleneck="continuous"), 4) is None


def test_pretrain_warns_of_codebook_churn_at_start(data, tmp_path):
    # debug.yaml: batch 4 and 8 codes a head; a threshold of 1 re-seeds codes in even use
    cfg = debug_cfg(data, "model.vq_dead_code_threshold=1.0", "trainer.max_steps=1")
    with pytest.warns(UserWarning, match="codebook churn"):
        pretrain(cfg, tmp_path / "run")


def test_the_report_shows_the_verdict_of_the_lam_run(tmp_path):
    from lapo.report import health_table

    assert health_table(tmp_path)[1:] == ([], [])  # no stage-1 run: no table
    (tmp_path / "lam").mkdir()
    health = {**assess({**HEALTHY, "val/latent_gain_db": 0.004}), "step": 3000}
    (tmp_path / "lam" / "metrics.json").write_text(json.dumps({"health": health}))
    text, header, rows = health_table(tmp_path)
    assert "step 3000: FAILED" in text and "latent_used: the world model" in text
    assert header[-1] == "result" and len(rows) == 5
    row = next(r for r in rows if r[0] == "latent_used")
    assert row[2:] == ["0.004", ">= 0.1", "FAIL"]


# --------------------------------------------------------------------------- the probe itself


def test_repeated_windows_do_not_inflate_the_probe():
    """Stage 1's validation repeats windows when its held-out part holds fewer than it reads
    (a 4-episode shard scored a probe of 0.61 where the same latents, each window once, scored
    0.13-0.19). Copies on both sides of the split let the probe memorise: latents that carry
    nothing must still score near chance, and exactly as the windows seen once do."""
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(300, 8, generator=g)  # (N, D): no information about the action
    actions = torch.randint(0, 15, (300,), generator=g)
    ids = list(range(300)) * 3  # window ids, as stage 1 passes (clip key, start)
    once = fit_probe(latents, actions, num_actions=15)
    thrice = fit_probe(latents.repeat(3, 1), actions.repeat(3), num_actions=15, windows=ids)
    assert thrice == once and once["probe_n"] == 300.0
    assert once["probe_acc"] < 0.2  # chance 1/15
    leaky = fit_probe(latents.repeat(3, 1), actions.repeat(3), num_actions=15)  # no ids
    assert leaky["probe_acc"] > once["probe_acc"] + 0.3  # what the copies did before


def test_the_probe_split_holds_out_whole_clips_when_sources_are_few():
    keys = [f"ep{e}__c{c:05d}" for e in range(3) for c in range(4) for _ in range(10)]  # 12 clips
    train, test = split_indices(len(keys), keys=keys, seed=0)
    train_clips, test_clips = {keys[i] for i in train}, {keys[i] for i in test}
    assert test_clips and train_clips and not train_clips & test_clips
    many = [f"ep{e}__c{c:05d}" for e in range(6) for c in range(2)]  # 6 sources: whole episodes
    train, test = split_indices(len(many), keys=many, seed=0)
    src = {i: many[i].split("__")[0] for i in range(len(many))}
    assert not {src[i] for i in train.tolist()} & {src[i] for i in test.tolist()}
