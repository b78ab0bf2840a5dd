"""Stage 3 (Accelerate): from latent actions to real ones, on a small labelled set.

    lapo finetune --lam RUN --policy RUN_P --labeled DATASET --label-budget N --out RUN_F

Methods (``--method``):

- ``lapo``: the pretrained IDM is frozen; its latent actions z[t] of the N labelled
  transitions are computed once and an ActionDecoder z -> true action is fitted
  (cross-entropy, or MSE for continuous actions). With ``--policy RUN_P
  --finetune-policy`` a second phase trains policy + decoder end to end on the same
  demos: policy(o[t-k+1..t]) -> z -> decoder -> true action, starting from the
  fitted decoder. Without ``--policy`` the run can label but not act.
- ``idm-supervised`` (VPT): an IDM of the same architecture trained from scratch on
  the N labels only (``--config``/``--set model.*`` shape it). With ``--lam RUN`` the
  IDM is instead stage 1's own (its architecture, weights and window shape), trained on
  the N labels from there: the pretrained IDM fine-tuned, not frozen as in ``lapo``.
- ``bc``: a policy network cloning the true actions from context frames (no --lam).

The loop is plain Accelerate: ``accelerate launch --multi_gpu --num_processes N -m
lapo.cli finetune ...`` (or ``torchrun --nproc_per_node N -m lapo.cli finetune ...``)
runs N processes on GPUs (NCCL) or, on a machine without CUDA, on CPUs (gloo).
Accelerate 1.x's ``accelerate launch --cpu`` starts a single process whatever
``--num_processes`` says (it needs mpirun for more), hence ``--multi_gpu`` on CPUs too;
slurm/finetune.sbatch does this for you. Each epoch ends with an evaluation on
held-out labelled episodes (never trained on; see lapo.labelled), a line in
RUN_F/metrics.jsonl and a checkpoint RUN_F/checkpoints/<phase>/epoch-XXXX;
``--resume`` continues from the newest. SIGTERM or SIGUSR1 saves
``epoch-XXXX-batch-YYYYYY`` at the next step and exits cleanly; resuming from it
replays the rest of that epoch in the same order, so the result equals an
uninterrupted run's. A NaN/inf loss or gradient skips the step or stops the run
(``nan_policy``); it never reaches the weights. The result is RUN_F/agent.safetensors +
agent.json (self-contained: `lapo label --model RUN_F` needs nothing else) and
RUN_F/metrics.json. ``--label-budgets 100,300,1000`` makes one such run per budget
for the label-budget curve (`lapo.finetune.budgets`).

| module        | concern                                                        |
| ------------- | -------------------------------------------------------------- |
| `objectives`  | what each phase trains: batch -> action logits, and its rows   |
| `state`       | checkpoints on disk, whole or absent; the best held-out epoch  |
| `loop`        | one phase: epochs, resume, stop signal, non-finite steps       |
| `plan`        | a method -> the agent and its phases                           |
| `stage`       | one run: check inputs, select labels, train, save RUN_F        |
| `budgets`     | one run per label budget (the label-budget curve)              |
| `command`     | the ``lapo finetune`` flags                                    |

Stage 3 imports no Lightning: optimiser, schedule, the non-finite rule and the stop
signal are the ones stages 1 and 2 use (`lapo.optim`, `lapo.errors`, `lapo.preempt`).
"""

from lapo.finetune.budgets import budget_run, fit_budget_curve
from lapo.finetune.loop import EpochSampler, Phase, heldout_metrics, run_phase
from lapo.finetune.objectives import BCFit, DecoderFit, IDMFit, PolicyFit, Rows, extract_latents
from lapo.finetune.plan import Plan, make_plan, window_shape
from lapo.finetune.stage import final_metrics, finetune, make_accelerator

__all__ = [
    "BCFit",
    "DecoderFit",
    "EpochSampler",
    "IDMFit",
    "Phase",
    "Plan",
    "PolicyFit",
    "Rows",
    "budget_run",
    "extract_latents",
    "final_metrics",
    "finetune",
    "fit_budget_curve",
    "heldout_metrics",
    "make_accelerator",
    "make_plan",
    "run_phase",
    "window_shape",
]
