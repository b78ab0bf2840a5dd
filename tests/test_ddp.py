"""DDP on CPU: two gloo processes launched by torchrun (as srun would launch them).

Both ranks must end with the same weights and the same VQ codebooks, and the shards
they trained on must not overlap.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.datagen import make_dataset

ROOT = Path(__file__).resolve().parents[1]

# Runs on every rank: the steps of `lapo.lam.pretrain`, then each rank dumps its own weights.
WORKER = """
import sys
from pathlib import Path
from safetensors.torch import save_file
from lapo.config import PretrainConfig, load_config
from lapo.data import VideoDataModule
from lapo.lam import LAMModule, action_info
from lapo.train import fit, prepare_run

config, out, *overrides = sys.argv[1:]
cfg = load_config(PretrainConfig, config, overrides)
prepare_run(cfg, out, resume=False)
dm = VideoDataModule(cfg.data)
num_actions, action_dim = action_info(dm.action_space)
module = LAMModule(cfg, num_actions=num_actions, action_dim=action_dim)
result = fit(module, dm, cfg.trainer, out)
rank = result.trainer.global_rank
state = {k: v.detach().clone().contiguous() for k, v in module.model.state_dict().items()}
save_file(state, str(Path(out) / f"rank{rank}.safetensors"))
print(f"rank {rank} of {result.trainer.world_size} done at step {result.trainer.global_step}")
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_cpu_ranks_agree_and_read_disjoint_shards(tmp_path):
    ds = make_dataset(tmp_path / "data", shards=5, clips_per_shard=2, clip_frames=16, size=32)
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    run = tmp_path / "run"
    steps = 6
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
        f"--master_port={free_port()}", str(script), str(ROOT / "configs/lam/debug.yaml"), str(run),
        f"data.path={ds.path}", "data.val_shards=1", f"trainer.max_steps={steps}",
        "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp",
        "trainer.log_keys=true", "trainer.val_every_n_steps=3", "model.bottleneck=vq",
        "trainer.max_minutes=30",  # a budget never spent: its clock is shared every step
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["PYTHONPATH"] = str(ROOT)
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=ROOT, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    assert "rank 0 of 2 done at step 6" in res.stdout and "rank 1 of 2 done at step 6" in res.stdout

    # identical weights and buffers (the VQ codebooks are buffers updated by EMA)
    w0, w1 = load_file(run / "rank0.safetensors"), load_file(run / "rank1.safetensors")
    assert w0.keys() == w1.keys()
    codebooks = [k for k in w0 if "_codebook.embed" in k]
    assert codebooks, f"no VQ codebook found among {sorted(w0)[:20]}"
    for k in w0:
        assert torch.equal(w0[k], w1[k]), f"ranks differ in {k}"
    # the export written by rank 0 at the end holds those same weights
    exported = load_file(run / "model.safetensors")
    assert all(torch.equal(exported[k], w0[k]) for k in w0)

    # each rank trained on `steps` batches, from shards no other rank read
    shards = {}
    for rank in (0, 1):
        lines = (run / "debug" / f"keys-rank{rank}.txt").read_text().splitlines()
        batch_steps = {int(line.split("\t")[0]) for line in lines}
        assert batch_steps == set(range(steps)), (
            f"rank {rank} trained on steps {sorted(batch_steps)}"
        )
        shards[rank] = {ds.clips[line.split("\t")[1]]["shard"] for line in lines}
    assert shards[0] and shards[1]
    assert not shards[0] & shards[1], f"ranks shared shards: {shards}"
    assert 4 not in shards[0] | shards[1], "the held-out validation shard was trained on"
