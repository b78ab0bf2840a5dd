"""Tests for lapo/models: shapes, gradient flow, overfitting, determinism, code round trips, DDP sync.

Data is made here: a sprite world where a square moves over a fixed textured background
by one of four true actions, so transitions really are caused by actions.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from lapo.config import ConfigError, ModelConfig, PolicyModelConfig
from lapo.models import (
    ActionDecoder,
    LatentActionModel,
    LatentPolicy,
    UNetFDM,
    code_histogram,
    codebook_stats,
    perplexity_from_counts,
    prepare_frames,
    usage_from_counts,
)

MOVES = np.array([(-2, 0), (2, 0), (0, -2), (0, 2)])  # up, down, left, right in (row, col) pixels


def sprite_windows(n: int, size: int = 16, context: int = 2, seed: int = 0):
    """n windows (n, k+1, 3, S, S) uint8 and the true action (n,) of the last transition."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    background = np.stack([xx * 6 + 20, yy * 6 + 20, (xx + yy) * 3 + 40]).astype(
        np.uint8
    )  # (3, S, S)
    frames = np.empty((n, context + 1, 3, size, size), np.uint8)
    actions = rng.integers(0, 4, size=(n, context))
    pos = rng.integers(3, size - 7, size=(n, 2))
    for i in range(n):
        p = pos[i].copy()
        for t in range(context + 1):
            img = background.copy()
            img[:, p[0] : p[0] + 4, p[1] : p[1] + 4] = np.array([255, 255, 0])[:, None, None]
            frames[i, t] = img
            if t < context:
                p = np.clip(p + MOVES[actions[i, t]], 0, size - 4)
    return torch.from_numpy(frames), torch.from_numpy(actions[:, -1]).long()


def tiny_cfg(**over) -> ModelConfig:
    base = dict(
        image_size=16, impala_scale=1, latent_dim=16, embed_dim=32, vq_heads=2, vq_codebook_size=8,
        fsq_levels=[3, 3], continuous_dim=4, fdm_channels=8, patch_size=4, tf_dim=32, tf_depth=1, tf_heads=2,
    )  # fmt: skip
    base.update(over)
    return ModelConfig(**base)


def first_idm_weight(model: LatentActionModel) -> torch.Tensor:
    return next(model.idm.encoder.parameters())


def state_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("encoder", ["impala", "transformer"])
@pytest.mark.parametrize("bottleneck", ["vq", "fsq", "continuous"])
def test_shapes(bottleneck, encoder):
    cfg = tiny_cfg(bottleneck=bottleneck, encoder=encoder)
    model = LatentActionModel(cfg, context=2)
    frames, _ = sprite_windows(5)
    enc = model.encode(frames)
    assert enc["latent"].shape == (5, 16) and enc["pre"].shape == (5, 16)
    assert enc["feats"].shape == (5, 32) and enc["quant_loss"].ndim == 0
    if bottleneck == "continuous":
        assert enc["codes"] is None and model.num_codes == 0
    else:
        heads = 2 if bottleneck == "vq" else 1
        assert enc["codes"].shape == (5, heads) and enc["codes"].dtype == torch.long
        assert int(enc["codes"].min()) >= 0 and int(enc["codes"].max()) < model.num_codes
    loss, logs, pred = model.loss(frames)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert pred.shape == (5, 3, 16, 16) and float(pred.min()) >= 0 and float(pred.max()) <= 1
    for key in ("fdm_mse", "quant_loss", "psnr", "psnr_copy", "loss"):
        assert logs[key].ndim == 0 and not logs[key].requires_grad
    assert ("perplexity" in logs) == (bottleneck != "continuous")


def test_frames_of_another_size_are_resized():
    frames, _ = sprite_windows(2, size=24)
    x = prepare_frames(frames, 16)
    assert x.shape == (2, 3, 3, 16, 16) and x.dtype == torch.float32
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    same = prepare_frames(frames, 24)
    assert torch.equal(same, frames.float() / 255)
    model = LatentActionModel(tiny_cfg(), context=2)
    _, _, pred = model.loss(frames)
    assert pred.shape == (2, 3, 16, 16)


def test_wrong_window_length_names_the_fault():
    model = LatentActionModel(tiny_cfg(), context=2)
    frames, _ = sprite_windows(2, context=3)
    with pytest.raises(ValueError, match="data.context"):
        model.loss(frames)


# --------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("bottleneck", ["vq", "fsq", "continuous"])
def test_world_model_loss_reaches_first_idm_layer(bottleneck):
    """Only the FDM's MSE is back-propagated: the gradient must cross the quantiser."""
    torch.manual_seed(0)
    model = LatentActionModel(tiny_cfg(bottleneck=bottleneck), context=2)
    x = model.prepare(sprite_windows(6)[0])
    enc = model.encode(x)
    pred = model.fdm(x[:, :-1], enc["latent"])
    F.mse_loss(pred, x[:, -1]).backward()
    grad = first_idm_weight(model).grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


# --------------------------------------------------------------------------- training behaviour


def train_steps(model, frames, steps, lr=2e-3, actions=None):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    history = []
    for _ in range(steps):
        loss, logs, _ = model.loss(frames, actions)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(logs)
    return history


def test_overfit_one_batch():
    torch.manual_seed(0)
    model = LatentActionModel(tiny_cfg(fdm_channels=16), context=2)
    frames, _ = sprite_windows(8)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    start, first, best = time.time(), None, float("inf")
    for _ in range(60):  # a fixed budget, so the ratio reached shows the margin
        loss, logs, _ = model.loss(frames)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = float(logs["fdm_mse"]) if first is None else first
        best = min(best, float(logs["fdm_mse"]))
    # best / first after 60 steps, seeds 0, 1, 2, measured 2026-12-02 (2-core AMD EPYC,
    # AVX2): 0.025, 0.030, 0.018 against 0.1 (the 1/10 mark is passed at steps 31, 37, 26)
    assert best < first / 10, f"fdm_mse went from {first:.4f} only to {best:.4f}"
    assert time.time() - start < 30


def test_seeded_runs_are_identical():
    frames, actions = sprite_windows(4)

    def run():
        torch.manual_seed(123)
        model = LatentActionModel(
            tiny_cfg(sup_weight=0.5, vq_kmeans_init=True), num_actions=4, context=2
        )
        train_steps(model, frames, 3, actions=actions)
        return model

    a, b = run(), run()
    assert state_equal(a, b)
    torch.manual_seed(7)  # a different seed gives a different model: the check can fail
    assert not state_equal(a, LatentActionModel(tiny_cfg(sup_weight=0.5), num_actions=4, context=2))


@pytest.mark.parametrize(
    "bottleneck,over",
    [("vq", {}), ("vq", {"vq_heads": 1}), ("vq", {"vq_heads": 1, "vq_cosine": True}), ("fsq", {})],
)
def test_codes_round_trip(bottleneck, over):
    torch.manual_seed(0)
    model = LatentActionModel(tiny_cfg(bottleneck=bottleneck, **over), context=2)
    frames, _ = sprite_windows(16)
    train_steps(model, frames, 2)  # move the codebook away from its initial state first
    model.eval()
    with torch.no_grad():
        enc = model.encode(frames)
        again = model.codes_to_latent(enc["codes"])
    torch.testing.assert_close(again, enc["latent"], rtol=0, atol=1e-6)


def test_vq_codebook_learns_in_training_only():
    torch.manual_seed(0)
    model = LatentActionModel(tiny_cfg(), context=2)
    frames, _ = sprite_windows(8)
    before = model.bottleneck.codebook.clone()
    model.eval()
    with torch.no_grad():
        model.loss(frames)
    assert torch.equal(before, model.bottleneck.codebook)
    model.train()
    model.loss(frames)
    assert not torch.equal(before, model.bottleneck.codebook)
    assert model.bottleneck.codebook.shape == (2, 8, 8)


def test_continuous_noise_only_in_training():
    torch.manual_seed(0)
    model = LatentActionModel(tiny_cfg(bottleneck="continuous", continuous_noise=0.5), context=2)
    frames, _ = sprite_windows(3)
    assert not torch.equal(model.encode(frames)["latent"], model.encode(frames)["latent"])
    model.eval()
    assert torch.equal(model.encode(frames)["latent"], model.encode(frames)["latent"])


@pytest.mark.parametrize("loss_kind", ["cosine", "mse"])
def test_latent_world_model(loss_kind):
    torch.manual_seed(0)
    model = LatentActionModel(
        tiny_cfg(fdm="latent", fdm_latent_loss=loss_kind, ema_decay=0.5), context=2
    )
    frames, _ = sprite_windows(6)
    target_before = [p.clone() for p in model.fdm.target.parameters()]
    history = train_steps(model, frames, 3)
    loss, logs, pred = model.loss(frames)
    assert pred is None and torch.isfinite(loss) and "psnr" not in logs
    assert all(not p.requires_grad and p.grad is None for p in model.fdm.target.parameters())
    moved = [not torch.equal(a, b) for a, b in zip(target_before, model.fdm.target.parameters())]
    assert any(moved), "the EMA target encoder never moved"
    assert all(torch.isfinite(h["fdm_loss"]) for h in history)
    assert model.predict_next(frames[:, :-1], torch.zeros(6, 16)) is None


def test_weak_supervision_uses_labelled_windows_only():
    torch.manual_seed(0)
    model = LatentActionModel(tiny_cfg(sup_weight=1.0), num_actions=4, context=2).eval()
    frames, actions = sprite_windows(6)
    has = torch.tensor([True, True, True, False, False, False])
    _, logs, _ = model.loss(frames, actions, has)
    other = actions.clone()
    other[3:] = (other[3:] + 1) % 4  # change only unlabelled rows
    _, logs2, _ = model.loss(frames, other, has)
    assert torch.equal(logs["sup_loss"], logs2["sup_loss"])
    other[0] = (other[0] + 1) % 4  # a labelled row does matter
    _, logs3, _ = model.loss(frames, other, has)
    assert not torch.equal(logs["sup_loss"], logs3["sup_loss"])
    loss, logs4, _ = model.loss(frames)  # no actions: head still in the graph, no sup logs
    assert "sup_loss" not in logs4 and torch.isfinite(loss)
    assert 0.0 <= float(logs["sup_acc"]) <= 1.0


def test_a_separate_labelled_batch_supervises_the_head_instead_of_the_stream():
    """`labelled=`: the head learns from the label budget only; the world model from both."""
    torch.manual_seed(0)
    model = LatentActionModel(tiny_cfg(sup_weight=1.0), num_actions=4, context=2).eval()
    frames, actions = sprite_windows(6)
    extra, extra_actions = sprite_windows(3, seed=5)
    with torch.no_grad():
        _, logs, pred = model.loss(frames, actions, labelled=(extra, extra_actions))
        _, logs2, _ = model.loss(frames, (actions + 1) % 4, labelled=(extra, extra_actions))
        _, logs3, _ = model.loss(frames, actions, labelled=(extra, (extra_actions + 1) % 4))
        _, alone, pred_alone = model.loss(frames)
    assert torch.equal(logs["sup_loss"], logs2["sup_loss"]), "the stream's labels were used"
    assert not torch.equal(logs["sup_loss"], logs3["sup_loss"])
    assert float(logs["sup_frac"]) == 1.0
    # the world model sees the stream batch alone, whatever rides along with it
    assert pred.shape == pred_alone.shape == (6, 3, 16, 16)
    assert torch.allclose(logs["fdm_mse"], alone["fdm_mse"], atol=1e-6)


def test_weak_supervision_continuous_actions():
    model = LatentActionModel(
        tiny_cfg(sup_weight=1.0, bottleneck="continuous"), context=2, action_dim=3
    )
    frames, _ = sprite_windows(4)
    loss, logs, _ = model.loss(frames, torch.randn(4, 3))
    loss.backward()
    assert "sup_loss" in logs and "sup_acc" not in logs


def test_fdm_loss_scale_copy_divides_by_the_copy_baseline():
    """fdm_loss_scale=copy: the objective is MSE / MSE(copy o[t]); the logged MSE is unchanged."""
    frames, _ = sprite_windows(8, seed=3)
    torch.manual_seed(0)
    plain = LatentActionModel(tiny_cfg(), context=2)
    torch.manual_seed(0)
    scaled = LatentActionModel(tiny_cfg(fdm_loss_scale="copy"), context=2)
    plain.eval(), scaled.eval()
    with torch.no_grad():
        _, lp, _ = plain.loss(frames)
        _, ls, _ = scaled.loss(frames)
        x = scaled.prepare(frames)
        copy_mse = F.mse_loss(x[:, -2], x[:, -1])
    assert torch.isclose(lp["fdm_mse"], ls["fdm_mse"])
    assert torch.isclose(ls["fdm_loss"], ls["fdm_mse"] / copy_mse, rtol=1e-4)
    assert ls["fdm_loss"] > 10 * ls["fdm_mse"]  # the sprite moves few pixels: MSEs are small


def test_fdm_loss_huber_is_scaled_by_copying_huber_and_keeps_the_logged_mse():
    """fdm_loss=huber: the objective is Huber / Huber(copy o[t]); fdm_mse and PSNR stay MSE."""
    frames, _ = sprite_windows(8, seed=3)
    torch.manual_seed(0)
    mse = LatentActionModel(tiny_cfg(fdm_loss_scale="copy"), context=2)
    torch.manual_seed(0)
    l1 = LatentActionModel(tiny_cfg(fdm_loss_scale="copy", fdm_loss="huber"), context=2)
    mse.eval(), l1.eval()
    with torch.no_grad():
        _, lm, pred = mse.loss(frames)
        _, ll, _ = l1.loss(frames)
        x = l1.prepare(frames)
        d = l1.cfg.fdm_huber_delta
        want = F.smooth_l1_loss(l1.fdm(x[:, :-1], l1.encode(frames)["latent"]), x[:, -1], beta=d)
        copy_l1 = F.smooth_l1_loss(x[:, -2], x[:, -1], beta=d)
    assert torch.isclose(lm["fdm_mse"], ll["fdm_mse"]) and torch.isclose(lm["psnr"], ll["psnr"])
    assert torch.isclose(ll["fdm_loss"], want / copy_l1, rtol=1e-3)
    assert not torch.isclose(ll["fdm_loss"], lm["fdm_loss"], rtol=1e-2)
    loss, _, _ = l1.train().loss(frames)
    loss.backward()
    assert all(p.grad is not None for p in l1.idm.parameters() if p.requires_grad)


@pytest.mark.slow
@pytest.mark.parametrize(
    "bottleneck,min_acc",
    [
        # Held-out probe accuracy and world model over copy after 200 steps with lapo's
        # cosine schedule, seeds 0, 1, 2, measured 2026-12-02 (2-core AMD EPYC, AVX2):
        # vq 1.00 / +16.4 dB, 1.00 / +13.8 dB, 1.00 / +18.8 dB;
        # fsq [8, 8] 1.00 / +18.7 dB, 1.00 / +15.5 dB, 1.00 / +17.9 dB;
        # continuous 1.00 / +15.4 dB, 1.00 / +18.1 dB, 1.00 / +18.0 dB.
        # At a constant lr the same CPU gave vq 0.87 / +8.3 dB (seed 2), fsq 0.96 / +2.8 dB
        # (seed 1) and continuous +1.8 dB (seed 0): the IDM still moved at the last step, and
        # the running statistics that eval-mode standardisation uses lagged behind it.
        # Before the continuous bottleneck standardised its input, 2 of 5 seeds sat at
        # 0.30-0.74 (the latent drowned in its noise); fsq with 3x3 levels stuck at 0.5 in
        # 2 of 5 seeds (two codes used).
        ("vq", 0.8),
        ("fsq", 0.65),
        ("continuous", 0.8),
    ],
)
def test_latent_actions_recover_true_actions(bottleneck, min_acc):
    """The method itself: trained on video alone, z[t] must carry the true action.

    Four actions move a sprite; chance is 0.25. The world model must also beat copying
    the last frame. Settings are the ones lapo recommends for small moving sprites:
    a residual world model and its loss scaled by the copy baseline's, and the learning
    rate schedule of `lapo pretrain` (cosine to zero, lapo.optim.lr_lambda).
    """
    from lapo.config import OptimConfig
    from lapo.optim import lr_lambda
    from lapo.probe import fit_probe

    torch.manual_seed(0)
    cfg = tiny_cfg(
        bottleneck=bottleneck, fdm_channels=16, vq_heads=1, vq_codebook_size=8, fsq_levels=[8, 8],
        fdm_residual=True, fdm_loss_scale="copy",
    )  # fmt: skip
    model = LatentActionModel(cfg, context=2)
    steps = 200
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(OptimConfig(), steps))
    for step in range(steps):
        loss, logs, _ = model.loss(sprite_windows(32, seed=step)[0])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    frames, actions = sprite_windows(512, seed=10_000)  # unseen windows
    with torch.no_grad():
        enc = model.encode(frames)
        _, logs, _ = model.loss(frames)
    acc = fit_probe(enc["latent"], actions, num_actions=4)["probe_acc"]  # lapo's own probe
    assert acc >= min_acc, f"{bottleneck}: probe accuracy {acc:.2f} (chance 0.25)"
    assert logs["psnr"] > logs["psnr_copy"] + 3, {k: float(v) for k, v in logs.items()}


# --------------------------------------------------------------------------- stats, policy, decoder


def test_codebook_stats():
    uniform = torch.arange(8).repeat(3).reshape(-1, 1)  # (24, 1): every code 3 times
    stats = codebook_stats(uniform, 8)
    assert torch.isclose(stats["perplexity"], torch.tensor(8.0)) and stats["usage"] == 1
    single = torch.full((10, 2), 5)
    counts = code_histogram(single, 8)
    assert counts.shape == (2, 8) and counts[:, 5].tolist() == [10.0, 10.0]
    assert torch.isclose(perplexity_from_counts(counts), torch.tensor(1.0))
    assert usage_from_counts(counts) == 1 / 8
    assert codebook_stats(None, 8) == {}


@pytest.mark.parametrize(
    "bottleneck,target,encoder",
    [
        ("vq", "codes", "impala"),
        ("fsq", "codes", "transformer"),
        ("continuous", "continuous", "impala"),
    ],
)
def test_policy_shapes(bottleneck, target, encoder):
    lam = LatentActionModel(tiny_cfg(bottleneck=bottleneck), context=2).eval()
    pcfg = PolicyModelConfig(
        encoder=encoder,
        impala_scale=1,
        hidden=32,
        target=target,
        patch_size=4,
        tf_dim=32,
        tf_depth=1,
        tf_heads=2,
    )
    policy = LatentPolicy.for_lam(pcfg, lam)
    frames, _ = sprite_windows(5)
    obs = frames[:, :-1]  # (B, k, 3, S, S): the policy never sees o[t+1]
    with torch.no_grad():
        enc = lam.encode(frames)
    out = policy(obs)
    if target == "codes":
        assert out.shape == (5, lam.code_heads, lam.num_codes)
        loss, logs = policy.loss(obs, enc["codes"])
        assert "code_acc" in logs
    else:
        assert out.shape == (5, 16)
        loss, logs = policy.loss(obs, enc["pre"])
    loss.backward()
    assert policy.features(obs).shape == (5, 32)
    assert policy.predict_latent(obs, lam.bottleneck).shape == (5, 16)


def test_policy_codes_needs_codes():
    lam = LatentActionModel(tiny_cfg(bottleneck="continuous"), context=2)
    with pytest.raises(ValueError, match="policy.target"):
        LatentPolicy.for_lam(PolicyModelConfig(impala_scale=1, hidden=8, target="codes"), lam)


def test_action_decoder():
    dec = ActionDecoder(16, num_actions=5, hidden=32, obs_dim=8)
    z, feats = torch.randn(7, 16), torch.randn(7, 8)
    assert dec(z, feats).shape == (7, 5)
    loss, logs = dec.loss(z, torch.randint(0, 5, (7,)), feats)
    loss.backward()
    assert dec.predict(z, feats).shape == (7,) and 0 <= float(logs["acc"]) <= 1
    with pytest.raises(ValueError, match="obs_feats"):
        dec(z)
    cont = ActionDecoder(16, action_dim=3)
    assert cont(z).shape == (7, 3) and cont.predict(z).shape == (7, 3)
    assert "mse" in cont.loss(z, torch.randn(7, 3))[1]
    with pytest.raises(ValueError, match="exactly one"):
        ActionDecoder(16, num_actions=3, action_dim=2)


def test_config_validation():
    with pytest.raises(ConfigError, match="model.image_size"):
        ModelConfig(image_size=40)  # the pixel U-Net needs a multiple of 16
    ModelConfig(image_size=40, fdm="latent")
    with pytest.raises(ConfigError, match="model.ema_decay"):
        ModelConfig(ema_decay=1.0)
    defaults = ModelConfig()
    assert (defaults.impala_scale, defaults.image_size, defaults.latent_dim) == (4, 64, 128)
    assert isinstance(LatentActionModel(tiny_cfg(), context=1).fdm, UNetFDM)


# --------------------------------------------------------------------------- DDP codebook sync


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    # both models are built BEFORE the process group exists, as Lightning does: with
    # sync_codebook=None the sync must switch itself on at the first training step
    models = {}
    for sync in (None, False):
        torch.manual_seed(0)
        models[sync] = LatentActionModel(
            tiny_cfg(vq_dead_code_threshold=1.0), context=2, sync_codebook=sync
        )
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world
    )
    frames, _ = sprite_windows(8, seed=100 + rank)  # every rank sees different data
    result = {}
    for sync, model in models.items():
        ddp = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
        opt = torch.optim.SGD(ddp.parameters(), lr=1e-2)
        for _ in range(3):
            loss, _, _ = ddp(frames)
            opt.zero_grad()
            loss.backward()
            opt.step()
        result[str(sync)] = {
            "codebook": model.bottleneck.codebook,
            "synced": model.bottleneck.synced,
        }
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_ddp_codebooks_stay_identical(tmp_path):
    """Two gloo ranks, different data: auto sync keeps codebooks equal; without sync they drift."""
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["None"]["synced"] and r1["None"]["synced"]
    assert torch.equal(r0["None"]["codebook"], r1["None"]["codebook"])
    assert not r0["False"]["synced"]
    assert not torch.equal(r0["False"]["codebook"], r1["False"]["codebook"])  # the check can fail


def test_idm_pool_max_says_what_moved_not_where():
    """model.idm_pool=max: the same motion 8 px away (the encoder's stride) gives nearly the
    same features (the zero padding at the frame's edge is all that differs), while the
    flattening head tells the two places apart."""
    from lapo.models.idm import IDM

    frames = torch.zeros(2, 3, 3, 32, 32)
    for t in range(3):  # a 2x2 sprite stepping right, at two places 8 px apart
        frames[0, t, :, 8:10, 8 + t : 10 + t] = 1.0
        frames[1, t, :, 16:18, 16 + t : 18 + t] = 1.0
    torch.manual_seed(0)
    pooled = IDM(tiny_cfg(image_size=32, idm_pool="max"), context=2).eval()
    torch.manual_seed(0)
    flat = IDM(tiny_cfg(image_size=32), context=2).eval()
    with torch.no_grad():
        fp, _ = pooled(frames)
        ff, _ = flat(frames)
    rel_pooled = ((fp[0] - fp[1]).norm() / fp[0].norm()).item()
    rel_flat = ((ff[0] - ff[1]).norm() / ff[0].norm()).item()
    assert rel_pooled < rel_flat / 3
    with pytest.raises(ConfigError, match="model.idm_pool"):
        tiny_cfg(idm_pool="max", encoder="transformer")
