"""The layering of docs/ARCHITECTURE.md, held: imports only run downwards.

Every module of lapo/ has a layer here; a new module fails `test_every_module_has_a_layer`
until it is given one (and a line in docs/ARCHITECTURE.md). Imports are read from the
source (`ast`), function-level ones included, so a lazy import cannot hide an upward one.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "lapo"

# layer -> modules (a trailing ".*" takes a whole package). Lower layers never import higher
# ones; "data" and "models" sit side by side and never import each other.
LAYERS: dict[str, list[str]] = {
    layer: names.split()
    for layer, names in {
        "base": "lapo lapo.errors lapo.io lapo.preempt lapo.tars lapo.video",
        "config": "lapo.config lapo.cli_args",
        "data": "lapo.shards lapo.validate lapo.windows lapo.timeline lapo.split lapo.ring "
        "lapo.stream lapo.loader lapo.labelled lapo.ingest lapo.ingest_plan lapo.source_video "
        "lapo.envs lapo.identifiability lapo.record lapo.data",
        "models": "lapo.models.* lapo.agent lapo.probe lapo.health",
        "runs": "lapo.runs lapo.resume lapo.checkpoint lapo.optim lapo.sharding lapo.callbacks "
        "lapo.train lapo.trainer lapo.rollouts lapo.plots",
        "stages": "lapo.lam lapo.lam_validation lapo.policy lapo.finetune.* lapo.label "
        "lapo.label_shard lapo.evaluate lapo.heldout lapo.export lapo.rl.* lapo.record_command",
        "top": "lapo.cli lapo.demo lapo.report lapo.stages",
    }.items()
}
RANK = {"base": 0, "config": 1, "data": 2, "models": 2, "runs": 3, "stages": 4, "top": 5}
# the stage each stage module belongs to (a prefix takes its submodules too): a stage never
# imports another stage
STAGE_OF = {
    "lapo.lam": "pretrain",
    "lapo.lam_validation": "pretrain",
    "lapo.policy": "train-policy",
    "lapo.finetune": "finetune",
    "lapo.label": "label",
    "lapo.label_shard": "label",
    "lapo.evaluate": "evaluate",
    "lapo.heldout": "evaluate",
    "lapo.export": "export",
    "lapo.rl": "rl",
    "lapo.record_command": "record",
}
TRAINING_FRAMEWORKS = ("lightning", "accelerate", "stable_baselines3")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def layer_of(mod: str) -> str | None:
    for layer, names in LAYERS.items():
        for n in names:
            if mod == n or (n.endswith(".*") and (mod == n[:-2] or mod.startswith(n[:-1]))):
                return layer
    return None


def stage_of(mod: str) -> str | None:
    for prefix, stage in STAGE_OF.items():
        if mod == prefix or mod.startswith(prefix + "."):
            return stage
    return None


def imports_of(mod: str, source: str | None = None) -> set[str]:
    """Every module `mod` imports (its file, or `source`), resolved to a lapo module where
    it is one."""
    path = MODULES[mod]
    tree = ast.parse(path.read_text() if source is None else source, filename=str(path))
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.add(target)
            for a in node.names:  # `from lapo.models import fdm` imports a module
                if f"{target}.{a.name}" in MODULES:
                    out.add(f"{target}.{a.name}")
    resolved = set()
    for name in out:
        while name and name not in MODULES and name.startswith("lapo"):
            name = name.rpartition(".")[0]  # lapo.models.fdm.UNetFDM -> lapo.models.fdm
        resolved.add(name or "lapo")
    return resolved


def test_every_module_has_a_layer():
    missing = [m for m in MODULES if layer_of(m) is None]
    assert not missing, f"give these a layer here and a line in docs/ARCHITECTURE.md: {missing}"


def upward(mod: str, deps: set[str]) -> list[str]:
    """The imports of `mod` that break the layering."""
    bad, mine = [], layer_of(mod)
    for dep in deps:
        if dep not in MODULES or dep == mod:
            continue
        theirs = layer_of(dep)
        if RANK[theirs] > RANK[mine]:
            bad.append(f"{mod} ({mine}) imports {dep} ({theirs})")
        elif {mine, theirs} == {"data", "models"}:
            bad.append(f"{mod} ({mine}) imports {dep} ({theirs}): data and models stay apart")
    return bad


def test_imports_only_run_downwards():
    bad = [line for mod in MODULES for line in upward(mod, imports_of(mod))]
    assert not bad, "\n".join(bad)


def test_a_stage_never_imports_another_stage():
    bad = []
    for mod in MODULES:
        mine = stage_of(mod)
        if mine is None:
            continue
        for dep in imports_of(mod):
            theirs = stage_of(dep)
            if theirs is not None and theirs != mine:
                bad.append(f"{mod} ({mine}) imports {dep} ({theirs})")
    assert not bad, "\n".join(bad)


def test_models_and_data_import_no_training_framework():
    bad = []
    for mod in MODULES:
        if layer_of(mod) not in ("models", "data", "base", "config") or mod == "lapo.data":
            continue  # lapo.data is the Lightning DataModule over the data layer
        for dep in imports_of(mod):
            if dep.split(".")[0] in TRAINING_FRAMEWORKS:
                bad.append(f"{mod} imports {dep}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize(
    "module", ["lapo.finetune", "lapo.label", "lapo.evaluate", "lapo.runs", "lapo.checkpoint"]
)
def test_plain_torch_stages_load_no_lightning(module):
    code = f"import sys, {module}; print('lightning' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False", f"import {module} loaded Lightning"


def test_the_checker_sees_an_upward_import():
    """The checks can fail: a lazy import of a stage inside a model function is caught."""
    src = MODULES["lapo.models.common"].read_text()
    src += "\n\ndef _late():\n    from ..lam import LAMModule\n\n    return LAMModule\n"
    deps = imports_of("lapo.models.common", src)
    assert "lapo.lam" in deps
    assert upward("lapo.models.common", deps) == [
        "lapo.models.common (models) imports lapo.lam (stages)"
    ]
