"""Procgen and BabyAI / MiniGrid behind one small interface, plus scripted policies.

Recording (`lapo.record`) and closed-loop evaluation both talk to an `Env`:

    env = make_env("babyai:BabyAI-GoToLocal-v0", size=64)
    frame = env.reset(seed=3)                        # (H, W, 3) uint8
    frame, reward, done, info = env.step(action)     # action: an env action id

Frames are what a policy acts from and what the video holds:

- Procgen: the game's own 64x64 observation. Other sizes are resized from it
  (smaller) or from the game's 512x512 render of the same view (larger).
- BabyAI / MiniGrid: the full top-down grid drawn without the agent's
  view-cone highlight (`view="full"`, the default). The whole room is visible, so
  a policy on one frame has all it needs for single-room levels such as
  GoToLocal, and a step changes few pixels (the agent's cell), which is what a
  latent action model should attend to. `view="agent"` draws the agent's 7x7
  egocentric view instead. Tiles are drawn at size // grid-width pixels when that
  divides exactly (64 px for an 8x8 grid: 8 px tiles), else drawn larger and
  resized; a non-square grid is letterboxed (aspect kept). The instruction is `env.mission`.

Procgen has no terminal observation: when an episode ends the game resets at
once. `step` then returns the previous frame again with `info["terminal_frame"]
= False`; MiniGrid's terminal observation is real (`True`).

`snapshot()` / `restore(state)` save and bring back the whole state (Procgen: the game's
own serialized state; MiniGrid: a deep copy), so an action can be tried and undone:
`lapo.identifiability` probes every action at a state this way.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import io
import re
from collections.abc import Callable

import numpy as np

from lapo.video import resize_square

PROCGEN_GAMES = (
    "bigfish", "bossfight", "caveflyer", "chaser", "climber", "coinrun", "dodgeball", "fruitbot",
    "heist", "jumper", "leaper", "maze", "miner", "ninja", "plunder", "starpilot",
)  # fmt: skip
PROCGEN_OPTIONS = (
    "center_agent", "use_backgrounds", "use_monochrome_assets", "restrict_themes",
    "use_generated_assets", "paint_vel_info",
)  # fmt: skip
POLICIES = ("random", "sticky", "expert")

# Levels where turning and moving forward are all that matters; random and sticky
# policies sample only these (action ids stay the env's own ids).
_NAV_ONLY = re.compile(
    r"^(BabyAI-GoTo(RedBall|RedBallGrey|RedBallNoDists|Obj|ObjS\d|Local|LocalS\d+N\d+|RedBlueBall"
    r"|Door|ObjDoor|Open|ObjMazeOpen)-v\d"
    r"|MiniGrid-(Empty|FourRooms|LavaCrossing|SimpleCrossing|DistShift|LavaGap|Dynamic-Obstacles).*)$"
)


class EnvError(ValueError):
    """Bad environment spec, option or call (the message names the spec)."""


def _fit(frame: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) -> an owned (size, size, 3) uint8 copy; letterboxed if not square."""
    if frame.shape[:2] == (size, size):
        return np.array(frame, dtype=np.uint8)
    return resize_square(frame, size, mode="pad")


class Env:
    """What recording and rollouts need from an environment.

    `num_actions` is the env's full discrete action count (ids are the env's ids);
    `sample_actions` is the subset random/sticky policies draw from.
    """

    spec: str
    size: int
    num_actions: int
    action_meanings: list[str]
    sample_actions: tuple[int, ...]
    mission: str | None = None
    has_expert: bool = False

    def reset(self, seed: int | None = None) -> np.ndarray:
        raise NotImplementedError

    def step(self, action: int) -> tuple[np.ndarray, float, bool, dict]:
        raise NotImplementedError

    def expert_action(self) -> int:
        raise EnvError(f"{self.spec}: no expert policy (only babyai:* levels have the BabyAI bot)")

    def snapshot(self) -> object:
        """An opaque copy of the current state, for `restore`; later steps do not change it."""
        raise EnvError(f"{self.spec}: {type(self).__name__} cannot save and restore its state")

    def restore(self, state: object) -> None:
        """Back to the state `snapshot` returned: the following steps (and resets without a
        seed) play exactly as they would have from there. A state can be restored many times."""
        raise EnvError(f"{self.spec}: {type(self).__name__} cannot save and restore its state")

    def close(self) -> None:
        pass

    def _next_seed(self, seed: int | None) -> int:
        # reset() without a seed walks seed, seed+1, ... from make_env's seed: reproducible.
        if seed is None:
            seed, self._auto_seed = self._auto_seed, self._auto_seed + 1
        return int(seed)


class ProcgenEnv(Env):
    """One Procgen game; each reset builds a one-level gym3 env (cheap: ~1 ms)."""

    def __init__(
        self,
        game: str,
        size: int,
        seed: int,
        *,
        distribution_mode: str = "easy",
        num_levels: int = 0,
        start_level: int = 0,
        **options,
    ) -> None:
        bad = [k for k in options if k not in PROCGEN_OPTIONS]
        if bad:
            raise EnvError(
                f"procgen:{game}: unknown option(s) {bad}; allowed: {list(PROCGEN_OPTIONS)}"
                " plus distribution_mode, num_levels, start_level"
            )
        if distribution_mode not in ("easy", "hard", "extreme", "memory", "exploration"):
            raise EnvError(f"procgen:{game}: unknown distribution_mode {distribution_mode!r}")
        if num_levels < 0 or start_level < 0:
            raise EnvError(
                f"procgen:{game}: num_levels and start_level must be >= 0, got "
                f"{num_levels} and {start_level}"
            )
        with contextlib.redirect_stderr(io.StringIO()):  # procgen imports gym; hide its notice
            from procgen import ProcgenGym3Env
        self._cls = ProcgenGym3Env
        self.spec, self.size, self.game = f"procgen:{game}", size, game
        self.distribution_mode = distribution_mode
        self.num_levels, self.start_level = num_levels, start_level
        self.options = options
        combos = self._make(0).get_combos()
        self.num_actions = len(combos)
        self.action_meanings = ["+".join(c) if c else "NOOP" for c in combos]
        self.sample_actions = tuple(range(self.num_actions))
        self._auto_seed, self._env, self._frame, self._pending = seed, None, None, None

    def _make(self, level: int):
        return self.gym3_env(1, num_levels=1, start_level=level, rand_seed=level)

    def gym3_env(self, num: int, *, num_levels: int, start_level: int, rand_seed: int,
                 num_threads: int = 0):  # fmt: skip
        """A `procgen.ProcgenGym3Env` of `num` games with this env's game and options,
        rendering what `frames` reads. Each game draws its levels from [start_level,
        start_level + num_levels) (0: any level) with a generator seeded from `rand_seed`;
        an episode's play depends only on its level and actions. `num_threads` > 0 steps
        the games in that many C++ threads, 0 in the calling one."""
        return self._cls(
            num=num, env_name=self.game, num_levels=num_levels, start_level=start_level,
            rand_seed=rand_seed, distribution_mode=self.distribution_mode,
            num_threads=num_threads, render_mode="rgb_array" if self.size > 64 else None,
            **self.options,
        )  # fmt: skip

    def frames(self, env, ob: dict) -> np.ndarray:
        """(num, size, size, 3) uint8: the frame of each game of `env` (a `gym3_env`) whose
        observation is `ob`, at this env's size (see the module docstring)."""
        if self.size > 64:
            return np.stack([_fit(info["rgb"], self.size) for info in env.get_info()])
        if self.size == 64:
            return np.array(ob["rgb"], dtype=np.uint8)
        return np.stack([_fit(frame, self.size) for frame in ob["rgb"]])

    def level_of(self, seed: int) -> int:
        """Procgen level played for `seed`: any level (num_levels=0) or one of a fixed set."""
        if self.num_levels > 0:
            return self.start_level + seed % self.num_levels
        return seed % 2**31

    def _observe(self) -> tuple[float, bool]:
        reward, ob, first = self._env.observe()
        self._pending = self.frames(self._env, ob)[0]
        return float(reward[0]), bool(first[0])

    def reset(self, seed: int | None = None) -> np.ndarray:
        self._env = self._make(self.level_of(self._next_seed(seed)))
        self._observe()
        self._frame = self._pending
        return self._frame

    def step(self, action: int) -> tuple[np.ndarray, float, bool, dict]:
        if self._env is None:
            raise EnvError(f"{self.spec}: step() before reset() or after the episode ended")
        self._env.act(np.array([action], dtype=np.int32))
        reward, first = self._observe()
        if first:  # the game already reset: the new frame belongs to the next episode
            success = bool(self._env.get_info()[0]["prev_level_complete"])
            self._env = None
            return self._frame, reward, True, {"terminal_frame": False, "success": success}
        self._frame = self._pending
        return self._frame, reward, False, {}

    def snapshot(self) -> tuple:
        """(gym3 env, its game state, frames, auto seed). The env object itself is kept: a step
        that ends the episode drops it from `self`, and `restore` must bring it back."""
        states = None if self._env is None else self._env.get_state()
        return self._env, states, self._frame, self._pending, self._auto_seed

    def restore(self, state: tuple) -> None:
        env, states, self._frame, self._pending, self._auto_seed = state
        if env is not None:
            env.set_state(states)
        self._env = env


class MiniGridEnv(Env):
    """A gymnasium MiniGrid or BabyAI level rendered to RGB (see the module docstring)."""

    def __init__(
        self,
        family: str,
        env_id: str,
        size: int,
        seed: int,
        *,
        view: str = "full",
        actions: tuple[int, ...] | None = None,
    ) -> None:
        import gymnasium as gym
        import minigrid  # noqa: F401  (registers the MiniGrid and BabyAI ids)

        self.spec, self.size = f"{family}:{env_id}", size
        if view not in ("full", "agent"):
            raise EnvError(f"{self.spec}: view must be 'full' or 'agent', got {view!r}")
        self.view = view
        self._env = gym.make(env_id)
        self._u = self._env.unwrapped
        n = int(self._env.action_space.n)
        self.num_actions = n
        self.action_meanings = [a.name for a in self._u.actions][:n]
        if actions is None:
            nav, no_done = (0, 1, 2), tuple(range(min(n, 6)))
            actions = (
                nav
                if _NAV_ONLY.match(env_id)
                else (no_done if family == "babyai" else tuple(range(n)))
            )
        self.sample_actions = tuple(int(a) for a in actions)
        self.has_expert = family == "babyai"
        self._auto_seed, self._bot, self._suggested, self._last = seed, None, None, None

    def _render(self) -> np.ndarray:
        u = self._u
        cells = u.agent_view_size if self.view == "agent" else max(u.width, u.height)
        tile = self.size // cells if self.size % cells == 0 else -(-self.size // cells)
        if self.view == "agent":
            frame = u.get_pov_render(tile_size=tile)
        else:
            frame = u.get_full_render(highlight=False, tile_size=tile)
        return _fit(frame, self.size)

    def reset(self, seed: int | None = None) -> np.ndarray:
        # BabyAI's level generator prints rejected samples to stdout; keep progress bars clean.
        with contextlib.redirect_stdout(io.StringIO()):
            self._env.reset(seed=self._next_seed(seed))
        self.mission = str(self._u.mission)
        self._bot, self._suggested, self._last = None, None, None
        return self._render()

    def step(self, action: int) -> tuple[np.ndarray, float, bool, dict]:
        _, reward, terminated, truncated, _ = self._env.step(int(action))
        self._last = int(action)
        done = bool(terminated or truncated)
        info = (
            {
                "terminal_frame": True,
                "success": bool(terminated and reward > 0),
                "truncated": bool(truncated and not terminated),
            }
            if done
            else {}
        )
        return self._render(), float(reward), done, info

    def expert_action(self) -> int:
        """The BabyAI bot's next action. Call once per step (it maps what the agent saw)."""
        if not self.has_expert:
            return super().expert_action()
        from minigrid.utils.baby_ai_bot import BabyAIBot

        if self._bot is None:
            self._bot = BabyAIBot(self._env)
            taken = None
        else:  # tell the bot what was really done when it differs from its advice
            taken = None if self._last == self._suggested else self._last
        self._suggested = int(self._bot.replan(taken))
        return self._suggested

    def snapshot(self) -> tuple:
        """A deep copy of the gymnasium env (wrappers, grid, RNG) and of the BabyAI bot that
        plays it, copied together so that the copied bot plays the copied env."""
        return copy.deepcopy(
            (self._env, self._bot, self._suggested, self._last, self.mission, self._auto_seed)
        )

    def restore(self, state: tuple) -> None:
        # copy again: the snapshot must stay as it was for the next restore
        (self._env, self._bot, self._suggested, self._last, self.mission,
         self._auto_seed) = copy.deepcopy(state)  # fmt: skip
        self._u = self._env.unwrapped


def _valid_minigrid_ids(prefix: str) -> list[str]:
    import gymnasium as gym
    import minigrid  # noqa: F401

    return sorted(k for k in gym.registry if k.startswith(prefix))


def _closest(name: str, valid: list[str], prefix: str) -> str:
    """The ids nearest to a mistyped one, ignoring case, the family prefix and the version."""

    def stem(env_id: str) -> str:
        low = env_id.lower()
        return re.sub(r"-v\d+$", "", low.removeprefix(prefix.lower()))

    by_stem: dict[str, list[str]] = {}
    for v in valid:
        by_stem.setdefault(stem(v), []).append(v)
    near = difflib.get_close_matches(stem(name), list(by_stem), n=5, cutoff=0.6)
    if near:
        ids = [v for s in near for v in by_stem[s]][:5]
        return f"did you mean {', '.join(ids)}? ({len(valid)} ids in all)"
    return f"none of the {len(valid)} ids is close (e.g. {', '.join(valid[:3])})"


def make_env(spec: str, *, size: int = 64, seed: int = 0, **kw) -> Env:
    """Build the environment named by `spec`: procgen:<game>, babyai:<id>, minigrid:<id>.

    `seed` is the first seed of reset() calls made without one. Extra keywords:
    procgen: distribution_mode ("easy"), num_levels (0: every level), start_level,
    and Procgen's rendering flags; babyai/minigrid: view ("full"|"agent"), actions.
    """
    family, _, name = spec.partition(":")
    if size < 8 or size % 2:
        raise EnvError(
            f"{spec}: size must be an even number >= 8 (H.264 needs even sides), got {size}"
        )
    if family == "procgen":
        if name not in PROCGEN_GAMES:
            raise EnvError(
                f"{spec}: unknown Procgen game {name!r}; valid: {', '.join(PROCGEN_GAMES)}"
            )
        return ProcgenEnv(name, size, seed, **kw)
    if family in ("babyai", "minigrid"):
        prefix = "BabyAI-" if family == "babyai" else "MiniGrid-"
        valid = _valid_minigrid_ids(prefix)
        if name not in valid and f"{prefix}{name}-v0" in valid:
            name = f"{prefix}{name}-v0"  # babyai:GoToLocal -> BabyAI-GoToLocal-v0
        if name not in valid:
            raise EnvError(
                f"{spec}: unknown {family} env id {name!r}; {_closest(name, valid, prefix)}"
            )
        bad = [k for k in kw if k not in ("view", "actions")]
        if bad:
            raise EnvError(f"{spec}: unknown option(s) {bad}; allowed: view, actions")
        return MiniGridEnv(family, name, size, seed, **kw)
    raise EnvError(f"{spec!r}: expected procgen:<game>, babyai:<env-id> or minigrid:<env-id>")


# --------------------------------------------------------------------------- policies


def episode_seeds(seed: int, episode: int) -> tuple[int, np.random.Generator]:
    """(env seed, policy RNG) of episode `episode` of a run seeded `seed`: independent of order."""
    ss = np.random.SeedSequence([int(seed), int(episode)])
    env_ss, policy_ss = ss.spawn(2)
    return int(env_ss.generate_state(1)[0] % 2**31), np.random.default_rng(policy_ss)


def make_policy(
    name: str, env: Env, rng: np.random.Generator, epsilon: float = 0.0
) -> Callable[[np.ndarray], int]:
    """A fresh per-episode policy `frame -> action id`.

    random: uniform over `env.sample_actions`; sticky: a uniform action held for
    1-4 steps (uniform), which gives the longer, smoother motions a video model
    sees in human play; expert: the BabyAI bot (babyai:* only).

    `epsilon` > 0 replaces each action, with that probability, by a uniform one
    from `env.sample_actions`. For the expert this matters beyond variety: a
    deterministic bot's next move is a function of the frame, so a world model can
    predict o[t+1] from o[t] alone and a latent action model has nothing to learn.
    The bot is still asked every step and is told what was really done, so it
    replans around the detour.
    """
    if name not in POLICIES:
        raise EnvError(f"unknown policy {name!r}; valid: {', '.join(POLICIES)}")
    if name == "expert" and not env.has_expert:
        raise EnvError(f"{env.spec}: policy 'expert' needs a babyai:* level (the BabyAI bot)")
    if not 0.0 <= epsilon <= 1.0:
        raise EnvError(f"epsilon must be in [0, 1], got {epsilon}")
    actions = np.asarray(env.sample_actions, dtype=np.int64)
    if epsilon > 0:
        base = make_policy(name, env, rng)

        def noisy(frame: np.ndarray) -> int:
            action = base(frame)  # always ask: the expert tracks every step
            return int(rng.choice(actions)) if rng.random() < epsilon else action

        return noisy
    if name == "expert":
        return lambda frame: env.expert_action()
    if name == "random":
        return lambda frame: int(rng.choice(actions))
    state = {"action": 0, "left": 0}

    def sticky(frame: np.ndarray) -> int:
        if state["left"] == 0:
            state["action"], state["left"] = int(rng.choice(actions)), int(rng.integers(1, 5))
        state["left"] -= 1
        return state["action"]

    return sticky
