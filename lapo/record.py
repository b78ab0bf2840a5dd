"""Record environment episodes into a sharded clip dataset (the format of design.md).

Alignment. An episode is frames o[0..T-1] with one row per frame: row t holds
the action taken after o[t] was seen, the reward it earned, and dones[t], which
is True exactly on the episode's last row (t = T-1). The final frame is kept:

- MiniGrid / BabyAI give a real terminal observation, and a run cut at
  `max_episode_steps` has one too (the frame after the last action). That frame
  had no action after it, so its row holds a filler: action 0, reward 0.
- Procgen resets itself the moment an episode ends and never shows the terminal
  frame. The last row then holds the real final action and its reward (often the
  episode's biggest), and no frame follows it.

Either way the sum of an episode's rewards is its return, and a row with
dones[t] True is never a transition: readers must not pair it with a next frame.

Clips. Each episode is cut into clips of `clip_frames` frames, consecutive clips
sharing `clip_overlap` frames (default 1). With one shared frame every
transition o[t] -> o[t+1] lies inside exactly one clip, so cutting loses none;
an overlap of k keeps every (k+1)-frame window whole in some clip.

Sharding. Shard i holds episodes [i*E, (i+1)*E) and episode e is seeded from
(seed, e) alone, so shards are independent: a process pool writes them in any
order, a rerun skips shards already on disk (writes are atomic), and the result
holds the same clips however it was produced (arrays and metadata byte for byte; the
x264 bytes of a clip have, rarely, differed between two encodes of the same frames).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import sys
import tarfile
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from queue import Empty
from types import SimpleNamespace

import numpy as np
from tqdm import tqdm

from lapo import __version__
from lapo.envs import POLICIES, Env, EnvError, episode_seeds, make_env, make_policy
from lapo.io import atomic_write_json, remove_stale_temporaries
from lapo.shards import (
    clip_key,
    clip_sample,
    shard_name,
    write_manifest,
    write_shard,
)
from lapo.tars import iter_tar_samples

FILLER_ACTION = 0
ARGS_FILE = "record_args.json"  # the settings of a recording, checked when it is resumed


@dataclass
class Episode:
    frames: np.ndarray  # (T, H, W, 3) uint8
    actions: np.ndarray  # (T,) int64
    rewards: np.ndarray  # (T,) float32
    dones: np.ndarray  # (T,) bool, True on the last row only
    success: bool
    terminal_frame: bool  # the last frame is a real observation after the last action taken
    mission: str | None = None

    @property
    def episode_return(self) -> float:
        return float(self.rewards.sum(dtype=np.float64))


def run_episode(env: Env, policy, env_seed: int, max_steps: int | None = None) -> Episode:
    """Play one episode of `policy` (frame -> action) from `env.reset(env_seed)`."""
    frames, actions, rewards = [env.reset(env_seed)], [], []
    mission, success, terminal_frame = env.mission, False, True
    while max_steps is None or len(actions) < max_steps:
        action = int(policy(frames[-1]))
        frame, reward, done, info = env.step(action)
        actions.append(action)
        rewards.append(reward)
        if done and not info.get("terminal_frame", True):
            terminal_frame = False  # Procgen: the last row keeps the real final action
            success = bool(info.get("success", False))
            break
        frames.append(frame)
        if done:
            success = bool(info.get("success", False))
            break
    if terminal_frame:  # the last frame saw no action: filler row
        actions.append(FILLER_ACTION)
        rewards.append(0.0)
    t = len(frames)
    dones = np.zeros(t, dtype=bool)
    dones[-1] = True
    return Episode(
        frames=np.stack(frames),
        actions=np.asarray(actions, dtype=np.int64),
        rewards=np.asarray(rewards, dtype=np.float32),
        dones=dones,
        success=success,
        terminal_frame=terminal_frame,
        mission=mission,
    )


def clip_starts(num_frames: int, clip_frames: int, overlap: int) -> list[int]:
    """Start frames of the clips of an episode; each clip adds at least one new frame."""
    stride = clip_frames - overlap
    starts = [0]
    while starts[-1] + clip_frames < num_frames:
        starts.append(starts[-1] + stride)
    return starts


def episode_id(spec: str, seed: int, index: int) -> str:
    return f"{spec}-s{seed}-e{index}"


def _episode_samples(ep: Episode, eid: str, index: int, args: dict) -> list[dict]:
    t = len(ep.frames)
    stats = {
        "spec": args["spec"],
        "policy": args["policy"],
        "epsilon": args.get("epsilon", 0.0),
        "seed": args["seed"],
        "episode_index": index,
        "episode_frames": t,
        "episode_return": ep.episode_return,
        "episode_success": ep.success,
        "terminal_frame": ep.terminal_frame,
    }
    if ep.mission is not None:
        stats["mission"] = ep.mission
    samples = []
    starts = clip_starts(t, args["clip_frames"], args["clip_overlap"])
    for c, start in enumerate(starts):
        end = min(start + args["clip_frames"], t)
        samples.append(
            clip_sample(
                clip_key(eid, c),
                ep.frames[start:end],
                fps=args["fps"],
                source=eid,
                episode=eid,
                start=start,
                actions=ep.actions[start:end],
                rewards=ep.rewards[start:end],
                dones=ep.dones[start:end],
                extra={**stats, "clip_index": c, "episode_end": end == t},
            )
        )
    return samples


_PROGRESS = None  # per-worker queue for episode ticks (set by the pool initializer)


def _init_worker(queue) -> None:
    global _PROGRESS
    _PROGRESS = queue


def _record_shard(args: dict, shard: int, out_dir: str) -> dict:
    """Record shard `shard` (its episodes only) and write it atomically; return its stats."""
    env = make_env(args["spec"], size=args["size"], seed=args["seed"], **args["env_kwargs"])
    first = shard * args["episodes_per_shard"]
    last = min(first + args["episodes_per_shard"], args["episodes"])
    episodes = []

    def samples():
        for e in range(first, last):
            env_seed, rng = episode_seeds(args["seed"], e)
            policy = make_policy(args["policy"], env, rng, args.get("epsilon", 0.0))
            ep = run_episode(env, policy, env_seed, args["max_episode_steps"])
            episodes.append((len(ep.frames), ep.episode_return, ep.success))
            yield from _episode_samples(ep, episode_id(env.spec, args["seed"], e), e, args)
            if _PROGRESS is not None:
                _PROGRESS.put(1)

    info = write_shard(Path(out_dir) / shard_name(shard), samples())
    env.close()
    return {**info, "episodes": episodes}


def _drain(queue, bar: tqdm) -> None:
    try:
        while True:
            bar.update(queue.get_nowait())
    except Empty:
        pass


def _shard_stats(path: Path) -> dict:
    """Stats of a shard already on disk (resume), read from its clips' json only."""
    samples = frames = 0
    episodes = {}
    for sample in iter_tar_samples(path):
        meta = json.loads(sample["json"])
        samples += 1
        frames += int(meta["num_frames"])
        episodes[meta["episode"]] = (
            meta["episode_frames"],
            meta["episode_return"],
            meta["episode_success"],
        )
    info = {"name": path.name, "samples": samples, "frames": frames, "bytes": path.stat().st_size}
    return {**info, "episodes": list(episodes.values())}


def _check_args(args: dict, out: Path) -> None:
    """Refuse to mix shards of a different recording into `out`."""
    file = out / ARGS_FILE
    if file.is_file():
        old = json.loads(file.read_text())
        diff = sorted(k for k in set(old) | set(args) if old.get(k) != args.get(k))
        if diff:
            raise ValueError(
                f"{out}: holds a recording made with other settings ({', '.join(diff)} differ: "
                f"{ {k: old.get(k) for k in diff} } vs { {k: args.get(k) for k in diff} }); "
                "use another --out or delete it"
            )
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)  # a killed run's partial shard or manifest; redone below
    # whole or not at all: a kill or a full disk never leaves half a settings file
    atomic_write_json(file, args, sort_keys=True)


def record_dataset(
    spec: str,
    out_dir: str | Path,
    *,
    episodes: int,
    policy: str = "random",
    epsilon: float = 0.0,
    seed: int = 0,
    size: int = 64,
    clip_frames: int = 64,
    clip_overlap: int = 1,
    episodes_per_shard: int = 16,
    workers: int = 1,
    max_episode_steps: int | None = None,
    fps: float = 15.0,
    env_kwargs: dict | None = None,
    progress: bool = True,
    verbose: bool = True,
) -> dict:
    """Record `episodes` episodes of `policy` in `spec` into shards + manifest.json under `out_dir`.

    Returns the manifest plus a ``summary`` dict (episodes, frames, shards written
    and skipped, mean return, success rate, frames per second).
    """
    for name, value, low in (
        ("episodes", episodes, 1),
        ("clip_frames", clip_frames, 2),
        ("episodes_per_shard", episodes_per_shard, 1),
        ("workers", workers, 1),
    ):
        if value < low:
            raise ValueError(f"record_dataset: {name} must be >= {low}, got {value}")
    if not 0 <= clip_overlap < clip_frames:
        raise ValueError(
            f"record_dataset: clip_overlap must be in [0, {clip_frames}), got {clip_overlap}"
        )
    if max_episode_steps is not None and max_episode_steps < 1:
        raise ValueError(f"record_dataset: max_episode_steps must be >= 1, got {max_episode_steps}")
    if policy not in POLICIES:
        raise EnvError(f"unknown policy {policy!r}; valid: {', '.join(POLICIES)}")
    env_kwargs = dict(env_kwargs or {})
    env = make_env(spec, size=size, seed=seed, **env_kwargs)  # fails early on a bad spec/option
    make_policy(policy, env, np.random.default_rng(0), epsilon)  # ... or a policy it cannot run
    args = {
        "spec": env.spec,
        "policy": policy,
        "seed": int(seed),
        "episodes": int(episodes),
        "size": int(size),
        "clip_frames": int(clip_frames),
        "clip_overlap": int(clip_overlap),
        "episodes_per_shard": int(episodes_per_shard),
        "max_episode_steps": max_episode_steps,
        "fps": float(fps),
        "env_kwargs": env_kwargs,
    }
    if epsilon:  # only when set, so recordings made before the option still resume
        args["epsilon"] = float(epsilon)
    out = Path(out_dir)
    _check_args(args, out)
    num_shards = -(-episodes // episodes_per_shard)
    done = {}
    for i in range(num_shards):
        path = out / shard_name(i)
        if path.is_file():
            try:
                done[i] = _shard_stats(path)
            except (tarfile.TarError, OSError, KeyError, ValueError) as e:
                # writes are atomic, so this is damage after the fact: record it again
                print(f"{path}: unreadable ({e}); recording it again", file=sys.stderr)
                path.unlink()
    todo = [i for i in range(num_shards) if i not in done]
    skipped_eps = sum(len(s["episodes"]) for s in done.values())
    bar = tqdm(
        total=episodes,
        initial=skipped_eps,
        unit="ep",
        desc=f"record {env.spec}",
        disable=not progress,
    )
    t0 = time.perf_counter()
    new: dict[int, dict] = {}
    if workers == 1 or len(todo) <= 1:
        _init_worker(SimpleNamespace(put=bar.update))  # tick the bar per episode, in process
        for i in todo:
            new[i] = _record_shard(args, i, str(out))
        _init_worker(None)
    else:
        # forkserver: workers fork from a clean server process (never from this one, which may
        # hold threads) that imported the recording code once, instead of once per worker.
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["lapo.record", "webdataset"])
        queue = ctx.Queue()
        pool = ProcessPoolExecutor(
            min(workers, len(todo)), mp_context=ctx, initializer=_init_worker, initargs=(queue,)
        )
        with pool:
            pending = {pool.submit(_record_shard, args, i, str(out)): i for i in todo}
            while pending:
                finished, _ = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                for fut in finished:
                    i = pending.pop(fut)
                    if fut.exception() is not None:
                        pool.shutdown(cancel_futures=True)
                        raise RuntimeError(
                            f"{out / shard_name(i)}: recording failed: {fut.exception()}"
                        ) from fut.exception()
                    new[i] = fut.result()
                _drain(queue, bar)
        bar.n = episodes
        bar.refresh()
    bar.close()
    seconds = time.perf_counter() - t0
    shards = [done[i] if i in done else new[i] for i in range(num_shards)]
    made_by = {
        "tool": "lapo.record",
        "lapo_version": __version__,
        **args,
        "action_meanings": env.action_meanings,
        "sample_actions": list(env.sample_actions),
        "filler_action": FILLER_ACTION,
        "alignment": "row t: action after frame t; dones[t] marks an episode's last frame (no next frame)",
    }
    manifest = write_manifest(
        out,
        shards,
        height=size,
        width=size,
        fps=fps,
        action_space={"type": "discrete", "n": env.num_actions},
        made_by=made_by,
    )
    env.close()
    eps = [e for s in shards for e in s["episodes"]]
    new_frames = sum(e[0] for s in new.values() for e in s["episodes"])
    summary = {
        "episodes": len(eps),
        "episode_frames": sum(e[0] for e in eps),
        "stored_frames": manifest["num_frames"],  # with the frames clips share
        "clips": manifest["num_samples"],
        "shards": num_shards,
        "shards_written": len(new),
        "shards_skipped": len(done),
        "mean_return": float(np.mean([e[1] for e in eps])),
        "success_rate": float(np.mean([e[2] for e in eps])),
        "mean_length": float(np.mean([e[0] for e in eps])),
        "seconds": seconds,
        "frames_per_second": new_frames / seconds if seconds > 0 else 0.0,
    }
    if verbose:
        print(
            f"{env.spec} ({policy}, seed {seed}) -> {out}: {summary['episodes']} episodes, "
            f"{summary['episode_frames']} frames (mean length {summary['mean_length']:.1f}), "
            f"{summary['clips']} clips, {num_shards} shards ({len(new)} written, {len(done)} already there); "
            f"mean return {summary['mean_return']:.3f}, success rate {summary['success_rate']:.3f}; "
            f"{new_frames} new frames in {seconds:.1f} s ({summary['frames_per_second']:.0f} frames/s)"
        )
    return {**manifest, "summary": summary}
