# Sourced by the stage scripts in this folder (pretrain, train_policy, finetune): what the
# job was given, and one srun over it that survives preemption signals.
#
#   lapo_command           LAPO_CMD: the lapo command as an array. LAPO may hold several
#                          words ("python -m lapo.cli"); default: lapo on PATH, else the
#                          repository's .venv/bin/lapo.
#   lapo_resources         NODES, TASKS_PER_NODE, CPUS_PER_TASK, GPUS_PER_NODE, ACCELERATOR;
#                          exits 2 naming the fix when tasks and GPUs disagree.
#   lapo_launch CMD...     srun CMD on every task, each with CPUS_PER_TASK CPUs; a SIGUSR1 sent
#                          to this shell (--signal=B:USR1, scancel --batch) runs LAPO_ON_USR1
#                          (default: pass it on to the tasks, which save and requeue the job).
#
# Environment: GPUS (0 forces CPU; N uses N per node; default: what the job can see).

lapo_command() {
    if [[ -n "${LAPO:-}" ]]; then
        read -r -a LAPO_CMD <<< "$LAPO"
    elif command -v lapo > /dev/null; then
        LAPO_CMD=(lapo)
    else
        LAPO_CMD=("$(cd "$LAPO_SLURM_DIR/.." && pwd)/.venv/bin/lapo")
    fi
}

# GPUs this job can use on this node: the ones Slurm lists in CUDA_VISIBLE_DEVICES; where
# Slurm does not manage GPUs at all, every GPU the node has.
lapo_visible_gpus() {
    if [[ -n "${CUDA_VISIBLE_DEVICES+set}" ]]; then
        case "$CUDA_VISIBLE_DEVICES" in
            "" | -1 | NoDevFiles) echo 0 ;;
            *) tr ',' '\n' <<< "$CUDA_VISIBLE_DEVICES" | grep -c . ;;
        esac
    elif scontrol show node "$(hostname -s)" 2> /dev/null | grep -q "Gres=[^ ]*gpu"; then
        echo 0  # Slurm hands out this node's GPUs and gave this job none
    elif command -v nvidia-smi > /dev/null; then
        nvidia-smi -L 2> /dev/null | grep -c '^GPU' || true
    else
        echo 0
    fi
}

lapo_resources() {
    NODES=${SLURM_JOB_NUM_NODES:-1}
    # Lightning wants devices == tasks per node; SLURM_NTASKS_PER_NODE is set only when
    # --ntasks-per-node was given
    TASKS_PER_NODE=${SLURM_NTASKS_PER_NODE:-$(( ${SLURM_NTASKS:-1} / NODES ))}
    # what the allocation holds on this node, shared among its tasks; srun (22.05+) does
    # not inherit --cpus-per-task, so lapo_launch passes it on
    if [[ -n "${SLURM_CPUS_PER_TASK:-}" ]]; then
        CPUS_PER_TASK=$SLURM_CPUS_PER_TASK
    else
        CPUS_PER_TASK=$(( ${SLURM_CPUS_ON_NODE:-1} / TASKS_PER_NODE ))
        (( CPUS_PER_TASK >= 1 )) || CPUS_PER_TASK=1
    fi
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$CPUS_PER_TASK}
    GPUS_PER_NODE=${GPUS:-$(lapo_visible_gpus)}
    if [[ "$GPUS_PER_NODE" == "0" ]]; then
        ACCELERATOR=cpu
        export CUDA_VISIBLE_DEVICES=""  # the tasks must not find a GPU the job was not given
        return
    fi
    ACCELERATOR=gpu
    if (( GPUS_PER_NODE < TASKS_PER_NODE )); then
        echo "$0: $TASKS_PER_NODE tasks per node but $GPUS_PER_NODE GPU(s) visible" \
             "(CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-unset}): one task per GPU; use" \
             "--ntasks-per-node=$GPUS_PER_NODE, ask for --gpus-per-node=$TASKS_PER_NODE," \
             "or GPUS=0 to train on CPUs" >&2
        exit 2
    fi
    if (( GPUS_PER_NODE > TASKS_PER_NODE )); then
        echo "$0: note: $GPUS_PER_NODE GPUs visible, $TASKS_PER_NODE task(s) per node use" \
             "the first $TASKS_PER_NODE" >&2
    fi
}

lapo_launch() {
    local bind=()
    # --gpus-per-task binds each task to its own GPU, but the frameworks pick cuda:LOCAL_RANK
    # among all of the node's GPUs
    if [[ "$ACCELERATOR" == gpu && -n "${SLURM_GPUS_PER_TASK:-}" ]]; then
        bind=(--gpu-bind=none)
    fi
    srun --kill-on-bad-exit=1 --cpus-per-task="$CPUS_PER_TASK" "${bind[@]}" "$@" &
    LAPO_SRUN=$!
    # shellcheck disable=SC2064  # the pid is fixed now
    trap "${LAPO_ON_USR1:-kill -USR1 $LAPO_SRUN}" USR1
    # `wait` returns early whenever a trap runs; wait again while srun is alive
    local status
    until wait "$LAPO_SRUN"; do
        status=$?
        kill -0 "$LAPO_SRUN" 2> /dev/null || return "$status"
    done
}
