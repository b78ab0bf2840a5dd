"""The label-budget curve's runs: one stage-3 run per label budget, all else the same.

    lapo finetune --label-budgets 100,300,1000 --lam RUN --labeled DATASET --out DIR

writes an ordinary RUN_F per budget, ``DIR/budget-N``, and ``DIR/budgets.json`` listing
them; ``lapo evaluate --budget-runs DIR`` scores every one on the same held-out windows.
Training stays here, in stage 3; evaluation only reads the runs.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from accelerate import Accelerator

from lapo.config import FinetuneConfig
from lapo.finetune.stage import RESUME_FREE, finetune, make_accelerator, run_sources
from lapo.io import atomic_write_json
from lapo.labelled import LabelledDataError
from lapo.resume import check_run_dir
from lapo.runs import BUDGET_CURVE


def budget_run(out: str | Path, budget: int) -> Path:
    """Where the run of `budget` lives in a budget curve's directory `out`."""
    return Path(out) / f"budget-{budget}"


def fit_budget_curve(
    cfg: FinetuneConfig,
    out: str | Path,
    labeled: str | Path,
    budgets: list[int],
    *,
    lam: str | Path | None = None,
    policy: str | Path | None = None,
    accelerator: Accelerator | None = None,
) -> list[dict] | None:
    """One run per budget in ``out/budget-N``: `cfg` with ``label_budget`` N; the rows of budgets.json.

    A finished run is reused and a begun one resumed, once its settings and inputs are
    checked to be these. A budget larger than the labelled data holds gets a row with an
    error instead of a run. Returns None, writing no budgets.json, when a signal stopped a
    run (its state is saved; the same call continues it).
    """
    out = Path(out)
    if cfg.method != "lapo":  # what finetune records as its inputs (it ignores these)
        lam = policy = None
    acc = accelerator or make_accelerator(cfg.mixed_precision)
    rows: list[dict] = []
    for b in budgets:
        run, bcfg = budget_run(out, b), replace(cfg, label_budget=b)
        if (run / "agent.json").is_file():
            sources = run_sources(labeled, lam, policy)
            check_run_dir(bcfg, run, sources, resume=True, free=RESUME_FREE, what="finetune run")
            acc.print(f"lapo finetune: budget {b}: reusing the finished run {run}")
        else:
            resume = (run / "config.yaml").is_file()
            try:
                metrics = finetune(bcfg, run, labeled, lam=lam, policy=policy, resume=resume,
                                   accelerator=acc)  # fmt: skip
            except LabelledDataError as e:  # checked before the run writes anything
                acc.print(f"lapo finetune: budget {b}: {e}")
                rows.append({"budget": b, "error": str(e)})
                continue
            if not metrics["finished"]:
                return None
        rows.append({"budget": b, "run": run.name})  # relative: DIR may move
    if acc.is_main_process:
        atomic_write_json(out / BUDGET_CURVE, {"rows": rows})
    acc.wait_for_everyone()
    made = sum("run" in r for r in rows)
    acc.print(f"lapo finetune: {made} of {len(rows)} budgets have a run in {out} ({BUDGET_CURVE})")
    return rows
