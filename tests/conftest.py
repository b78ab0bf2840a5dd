import os

# Two cores are shared by the whole suite; keep each process to one BLAS thread
# so that tests with worker processes do not oversubscribe the machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")

# the session-wide local Slurm cluster of the opt-in Slurm tests (LAPO_SLURM_TEST=1)
from tests.slurm_harness import slurm  # noqa: E402, F401
