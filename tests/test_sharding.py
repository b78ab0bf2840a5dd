"""Weight-decay groups and FSDP: the groups must not depend on how the module is wrapped.

FSDP with ``use_orig_params=True`` shows every parameter as a 1-D shard under a name with
``_fsdp_wrapped_module.`` inserted; `lapo.optim` decides the groups from the unwrapped
module. The slow test trains one step of the debug LAM under DDP and under FSDP (two gloo
processes each, FSDP on CPU) and compares the optimiser's groups parameter by parameter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lapo.config import PretrainConfig, load_config
from lapo.lam import LAMModule
from lapo.optim import decayed_names, plain_name, weight_decay_groups
from lapo.sharding import fsdp_mixed_precision
from tests.datagen import make_dataset
from tests.test_ddp import free_port

ROOT = Path(__file__).resolve().parents[1]
DEBUG = ROOT / "configs/lam/debug.yaml"


def group_names(groups: list[dict], names: dict[int, str]) -> list[tuple[float, list[str]]]:
    return [(g["weight_decay"], sorted(names[id(p)] for p in g["params"])) for g in groups]


def test_groups_from_fsdp_style_names_and_flat_shards_match_the_plain_module():
    module = LAMModule(load_config(PretrainConfig, DEBUG), num_actions=3)
    decayed = decayed_names(module)
    plain = list(module.named_parameters())
    want = group_names(weight_decay_groups(plain, decayed, 0.1), {id(p): n for n, p in plain})
    assert want[0][1] and want[1][1], "both groups must hold parameters"
    assert all(n.endswith("weight") for n in want[0][1])
    assert any(n.endswith("bias") for n in want[1][1])

    # what FSDP(use_orig_params=True) shows: unit prefixes in the names, flat 1-D shards
    def fsdp_name(n: str) -> str:
        return "_fsdp_wrapped_module." + n.replace("stages.0.", "stages.0._fsdp_wrapped_module.")

    shown = [(fsdp_name(n), torch.nn.Parameter(p.detach().flatten()[:1])) for n, p in plain]
    assert any("_fsdp_wrapped_module.conv" in n for n, _ in shown)
    naive = [p for _, p in shown if p.ndim >= 2]
    assert not naive, "flat shards: the old ndim rule would decay nothing"
    got = weight_decay_groups(shown, decayed, 0.1)
    assert group_names(got, {id(p): plain_name(n) for n, p in shown}) == want


def test_fsdp_keeps_buffers_in_fp32():
    for precision in ("bf16-mixed", "16-mixed"):
        mp = fsdp_mixed_precision(precision)
        assert mp.buffer_dtype == torch.float32 and mp.param_dtype != torch.float32
    assert fsdp_mixed_precision("32-true") is None


# Runs on every rank: one training step, then the optimiser's groups by parameter name.
WORKER = """
import json, sys
from pathlib import Path
from lapo.config import PretrainConfig, load_config
from lapo.data import VideoDataModule
from lapo.lam import LAMModule, action_info
from lapo.optim import plain_name
from lapo.train import fit, prepare_run

seen = {}


def on_train_start(self):  # wrapped and with its optimiser: what training will use
    names = {id(p): plain_name(n) for n, p in self.named_parameters()}
    seen["groups"] = [[g["weight_decay"], sorted(names[id(p)] for p in g["params"])]
                      for g in self.trainer.optimizers[0].param_groups]
    seen["wrapper"] = type(self.trainer.strategy.model).__name__


LAMModule.on_train_start = on_train_start
config, out, *overrides = sys.argv[1:]
cfg = load_config(PretrainConfig, config, overrides)
prepare_run(cfg, out, resume=False)
dm = VideoDataModule(cfg.data)
module = LAMModule(cfg, num_actions=action_info(dm.action_space)[0])
trainer = fit(module, dm, cfg.trainer, out).trainer
seen["step"] = trainer.global_step
Path(out, f"groups-rank{trainer.global_rank}.json").write_text(json.dumps(seen))
"""


def _run_two_ranks(tmp_path: Path, data: Path, strategy: str) -> list[dict]:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / strategy
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
        f"--master_port={free_port()}", str(script), str(DEBUG), str(out), f"data.path={data}",
        "data.val_shards=1", "trainer.max_steps=1", "trainer.accelerator=cpu", "trainer.devices=2",
        f"trainer.strategy={strategy}", "trainer.val_every_n_steps=1000", "trainer.loggers=[]",
        "optim.weight_decay=0.1",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["PYTHONPATH"] = str(ROOT)
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    return [json.loads((out / f"groups-rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.slow
def test_weight_decay_groups_are_the_same_under_ddp_and_fsdp(tmp_path):
    data = make_dataset(tmp_path / "data", shards=5, clips_per_shard=2, clip_frames=16, size=32)
    ddp = _run_two_ranks(tmp_path, data.path, "ddp")
    fsdp = _run_two_ranks(tmp_path, data.path, "fsdp")
    assert {r["wrapper"] for r in ddp} == {"DistributedDataParallel"}
    assert {r["wrapper"] for r in fsdp} == {"FullyShardedDataParallel"}
    assert all(r["step"] == 1 for r in ddp + fsdp), "each run must have trained a step"
    decay, no_decay = ddp[0]["groups"]
    assert decay[0] > 0 and decay[1] and no_decay[0] == 0 and no_decay[1]
    for r in ddp[1:] + fsdp:
        assert r["groups"] == ddp[0]["groups"]
