"""Datasets for training: resolve shards and manifests, make loaders, the LightningDataModule.

``make_loader`` gives one rank's loader of windows without Lightning
(Accelerate, labelling, evaluation); ``VideoDataModule`` does the same for
Lightning, with rank and world size from the trainer. How shards become
windows is in ``lapo.stream`` (splitting, the webdataset pipeline),
``lapo.loader`` (epochs and mid-epoch resume) and ``lapo.windows`` (checking,
decoding and cutting one clip).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import lightning.pytorch as pl
import torch
import webdataset as wds
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from lapo.config import DataConfig
from lapo.loader import WindowLoader
from lapo.shards import MANIFEST, read_manifest
from lapo.split import SplitError, read_keys, split_by_source
from lapo.stream import WindowDataset, share, split_note, split_plan
from lapo.windows import BadDataWarning, DatasetError, LoaderStats

__all__ = [
    "BadDataWarning",
    "DatasetError",
    "DatasetInfo",
    "LoaderStats",
    "VideoDataModule",
    "WindowDataset",
    "WindowLoader",
    "check_context",
    "dataset_info",
    "list_shards",
    "make_loader",
    "share",
    "split_plan",
    "split_train_val",
]


# --------------------------------------------------------------------------- what a dataset holds


@dataclass
class DatasetInfo:
    """Shard URLs plus what the manifest says about them (None where there is no manifest)."""

    urls: list[str]
    root: str | None = None
    action_space: dict | None = None
    height: int | None = None
    width: int | None = None
    fps: float | None = None
    clip_frames: float | None = None
    """Mean frames per clip of the shard with the longest clips."""
    num_samples: int | None = None
    shards: list[dict] = field(default_factory=list)
    keys: frozenset[str] | None = None
    """The sample keys read from these shards (None: all of them)."""

    @property
    def frame_size(self) -> tuple[int, int] | None:
        return None if self.height is None else (self.height, self.width)

    def subset(self, urls: list[str]) -> DatasetInfo:
        names = {Path(u).name for u in urls}
        shards = [s for s in self.shards if s["name"] in names]
        out = DatasetInfo(**{**self.__dict__, "urls": list(urls), "shards": shards})
        out.num_samples = sum(int(s["samples"]) for s in shards) if shards else None
        return out

    def with_keys(self, by_url: dict[str, list[str]]) -> DatasetInfo:
        """Only these sample keys of these shards (URL -> keys)."""
        out = self.subset([u for u in self.urls if by_url.get(u)])
        out.keys = frozenset(k for ks in by_url.values() for k in ks)
        out.num_samples = len(out.keys)
        return out


def _is_remote(url: str) -> bool:
    return "://" in url or url.startswith("pipe:")


def _from_manifest(root: Path, urls: list[str] | None) -> DatasetInfo:
    try:
        m = read_manifest(root)
    except (OSError, ValueError) as e:
        raise DatasetError(f"dataset {root}: {e}") from e
    shards = [s for s in m["shards"] if int(s.get("samples", 0)) > 0]
    if not shards:
        raise DatasetError(
            f"dataset {root}: {MANIFEST} lists no shard with samples (empty dataset)"
        )
    if urls is None:
        urls = [str(root / s["name"]) for s in shards]
        missing = [u for u in urls if not Path(u).is_file()]
        if missing:
            raise DatasetError(
                f"dataset {root}: {len(missing)} shard(s) in {MANIFEST} are missing, e.g. {missing[0]}"
            )
    lengths = [int(s["frames"]) / int(s["samples"]) for s in shards]
    return DatasetInfo(
        urls=urls,
        root=str(root),
        action_space=m.get("action_space"),
        height=int(m["height"]),
        width=int(m["width"]),
        fps=float(m["fps"]),
        clip_frames=max(lengths),
        num_samples=sum(int(s["samples"]) for s in shards),
        shards=shards,
    )


def dataset_info(path: str | Path | Sequence[str]) -> DatasetInfo:
    """Resolve a dataset: a directory with manifest.json, a .tar, a brace/URL pattern or a URL list.

    For patterns and lists of local shards, a manifest.json beside the first
    shard supplies the action space and frame size.
    """
    if isinstance(path, (list, tuple)):
        urls = [str(u) for u in path]
    else:
        spec = str(path)
        local = Path(spec)
        if not _is_remote(spec) and "{" not in spec and "::" not in spec:
            if not local.exists():
                raise DatasetError(f"dataset path {spec} does not exist")
            if local.is_dir():
                if (local / MANIFEST).is_file():
                    return _from_manifest(local, None)
                tars = sorted(str(p) for p in local.glob("*.tar"))
                if not tars:
                    raise DatasetError(
                        f"dataset {spec}: no {MANIFEST} and no .tar shards in the directory"
                    )
                warnings.warn(
                    f"dataset {spec}: no {MANIFEST}; using its {len(tars)} .tar files", stacklevel=2
                )
                return DatasetInfo(urls=tars, root=spec)
        urls = wds.shardlists.expand_urls(spec)
    if not urls:
        raise DatasetError(f"dataset {path}: the pattern names no shards")
    missing = [u for u in urls if not _is_remote(u) and not Path(u).is_file()]
    if missing:
        raise DatasetError(
            f"dataset {path}: shard {missing[0]} does not exist ({len(missing)} missing)"
        )
    first = urls[0]
    if not _is_remote(first) and (Path(first).parent / MANIFEST).is_file():
        info = _from_manifest(Path(first).parent, urls)
        return info.subset(urls)
    return DatasetInfo(urls=urls)


def list_shards(path: str | Path | Sequence[str]) -> list[str]:
    """Shard URLs of a dataset directory (from its manifest), a brace/URL pattern or a list."""
    return dataset_info(path).urls


def check_context(info: DatasetInfo, cfg: DataConfig, where: str = "data.path") -> None:
    """Fail at start-up when a window is longer than the dataset's clips."""
    span = cfg.context * cfg.frame_gap + 1
    if info.clip_frames is not None and span > info.clip_frames:
        raise DatasetError(
            f"{where}: data.context={cfg.context} with data.frame_gap={cfg.frame_gap} needs windows of "
            f"{span} frames, but clips in {info.root} hold {info.clip_frames:.1f} frames on average "
            f"({MANIFEST}); lower context/frame_gap or re-shard with longer clips"
        )


def make_loader(
    paths: str | Path | Sequence[str],
    cfg: DataConfig,
    *,
    train: bool,
    rank: int = 0,
    world_size: int = 1,
    info: DatasetInfo | None = None,
    batched: bool = True,
    epoch_fn: Callable[[], int] | None = None,
    pin_memory: bool = False,
) -> WindowLoader:
    """A loader of windows for one rank, without Lightning (Accelerate, labelling, evaluation).

    ``paths``: a dataset directory, a brace/URL pattern or a list of shard URLs.
    ``train``: endless resampled stream cut to ``cfg.batches_per_epoch`` batches,
    shuffled; otherwise one deterministic pass in order giving exactly ``cfg.val_batches``
    batches on every rank (cycling when the rank's part is shorter), or with 0 the whole
    split once, at least one batch per rank (``lapo.stream``). ``info`` skips reading
    the manifest again.
    """
    info = info or dataset_info(paths)
    check_context(info, cfg)
    workers = max(cfg.num_workers, 1)
    note = split_note(len(info.urls), world_size, workers)
    if note:
        warnings.warn(f"lapo.data ({'train' if train else 'val'}): {note}", stacklevel=2)
    dataset = WindowDataset(
        info.urls,
        cfg,
        train=train,
        rank=rank,
        world_size=world_size,
        action_space=info.action_space,
        frame_size=info.frame_size,
        batch_size=cfg.batch_size if batched else None,
        stats=LoaderStats(workers),
        keys=info.keys,
    )
    return WindowLoader(
        dataset, num_workers=cfg.num_workers, pin_memory=pin_memory, epoch_fn=epoch_fn
    )


def val_shard_count(cfg: DataConfig, info: DatasetInfo) -> int:
    """``data.val_shards``, or more of the last shards (at most half of them) until they hold
    the windows one validation pass reads (``val_batches`` x ``batch_size``, per rank), so
    that validation does not repeat windows. Needs the manifest's frame counts per shard."""
    n, k = len(info.urls), cfg.val_shards
    frames = {s["name"]: s for s in info.shards or []}
    rows = [frames.get(Path(u).name) for u in info.urls]
    need = cfg.val_batches * cfg.batch_size
    if not need or any(r is None or "frames" not in r for r in rows):
        return k
    span = cfg.context * cfg.frame_gap
    windows = [max(int(r["frames"]) - int(r["samples"]) * span, 0) for r in rows]  # per shard
    while k < n // 2 and sum(windows[n - k :]) < need:
        k += 1
    return k


def split_train_val(cfg: DataConfig) -> tuple[DatasetInfo, DatasetInfo | None]:
    """Training and validation data: ``val_path``; else the last ``val_shards`` shards of
    ``path``; else, when ``path`` has too few shards for that, whole source videos
    (``lapo.split``, logged on rank zero)."""
    if not cfg.path:
        raise DatasetError("data.path: no dataset given")
    info = dataset_info(cfg.path)
    if cfg.val_path:
        val = dataset_info(cfg.val_path)
        check_context(val, cfg, "data.val_path")
        return info, val
    if cfg.val_shards == 0:
        return info, None
    n = len(info.urls)
    if cfg.val_shards < n:
        k = val_shard_count(cfg, info)
        if k > cfg.val_shards:
            rank_zero_info(
                f"lapo.data: holding out the last {k} shards of {cfg.path}, not "
                f"data.val_shards={cfg.val_shards}: fewer hold fewer windows than a validation "
                f"pass reads (data.val_batches={cfg.val_batches} x batch_size={cfg.batch_size}), "
                "and repeated windows would let the latent probe memorise them"
            )
        return info.subset(info.urls[: n - k]), info.subset(info.urls[n - k :])
    why = f"data.val_shards={cfg.val_shards} would hold out all {n} shard(s) of {cfg.path}"
    remote = [u for u in info.urls if _is_remote(u)]
    if remote:
        raise DatasetError(
            f"{why}, and lapo cannot list the source videos of remote shards ({remote[0]}); "
            "give data.val_path, or data.val_shards=0 for no validation"
        )
    try:
        split = split_by_source(read_keys(info.urls), cfg.val_fraction)
    except SplitError as e:
        raise DatasetError(
            f"{why}, and {e}; give data.val_path, or data.val_shards=0 for no validation"
        ) from e
    note = (
        f"lapo.data: {cfg.path} has {n} shard(s), too few to hold out data.val_shards="
        f"{cfg.val_shards}; {split.describe()} (data.val_fraction={cfg.val_fraction:g})"
    )
    if split.one_source:
        rank_zero_warn(note)
    else:
        rank_zero_info(note)
    return info.with_keys(split.train), info.with_keys(split.val)


# --------------------------------------------------------------------------- Lightning


class VideoDataModule(pl.LightningDataModule):
    """Training and validation windows for Lightning, one loader per rank.

    ``setup`` reads the manifest (action space, frame size) and splits the shards;
    rank and world size come from the trainer. The training loader follows the
    trainer's epoch and is resumable mid-epoch (Lightning saves its state_dict).
    """

    def __init__(self, cfg: DataConfig):
        super().__init__()
        self.cfg = cfg
        self.train_info: DatasetInfo | None = None
        self.val_info: DatasetInfo | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_info is None:
            self.train_info, self.val_info = split_train_val(self.cfg)
            check_context(self.train_info, self.cfg)

    @property
    def info(self) -> DatasetInfo:
        self.setup()
        return self.train_info

    @property
    def action_space(self) -> dict | None:
        """``{"type": "discrete", "n": N}``, ``{"type": "continuous", "dim": D}`` or None."""
        return self.info.action_space

    @property
    def num_actions(self) -> int:
        space = self.action_space
        return int(space["n"]) if space and space["type"] == "discrete" else 0

    @property
    def frame_size(self) -> tuple[int, int] | None:
        return self.info.frame_size

    @property
    def image_size(self) -> int | None:
        """Side of the (square) frames; the height if they are not square."""
        return self.info.height

    def _rank(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _pin(self) -> bool:
        """Pinned host memory only when batches go to a CUDA device."""
        try:
            return self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"
        except Exception:  # no strategy yet (a loader asked for outside fit/validate)
            return torch.cuda.is_available()

    def _epoch(self) -> int:
        return self.trainer.current_epoch if self.trainer is not None else 0

    def train_dataloader(self) -> WindowLoader:
        rank, world = self._rank()
        return make_loader(
            self.info.urls,
            self.cfg,
            train=True,
            rank=rank,
            world_size=world,
            info=self.info,
            epoch_fn=self._epoch,
            pin_memory=self._pin(),
        )

    def val_dataloader(self) -> WindowLoader | list:
        self.setup()
        if self.val_info is None:
            return []
        rank, world = self._rank()
        return make_loader(
            self.val_info.urls,
            self.cfg,
            train=False,
            rank=rank,
            world_size=world,
            info=self.val_info,
            pin_memory=self._pin(),
        )
