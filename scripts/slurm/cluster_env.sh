# Sourced by the sbatch scripts after `cd $SLURM_SUBMIT_DIR` and activating the venv: the job's
# rendezvous, the processes per node, and the communication environment. A variable already exported
# when submitting wins (sbatch passes the submitting shell's environment on); docs/cluster.md explains each.

die() { echo "distopt sbatch: $*" >&2; exit 1; }

# --- Rendezvous: the job's first node and port 20000 + SLURM_JOB_ID mod 10000 (launcher/cluster.py),
# so that two jobs sharing a node never race for one fixed port. MASTER_ADDR / MASTER_PORT override.
rendezvous=$(python -m launcher.cluster) || die "no rendezvous (see the error above)"

# --- Processes per node: one per GPU. The job's --gpus-per-node=[type:]N when it gave one; otherwise
# counted by one task on every node (the batch host alone may not be typical), as the ranks will see
# them (CUDA_VISIBLE_DEVICES, cgroups). srun starts as many tasks on every node, so the nodes must
# agree. No GPU on any node: 2 CPU ranks on gloo. DISTOPT_PROCS_PER_NODE overrides all of this.
procs_per_node() {
  local gpus=${SLURM_GPUS_PER_NODE:-}
  local procs=${DISTOPT_PROCS_PER_NODE:-${gpus##*:}}
  if [ -z "$procs" ]; then
    # --overlap: the probe holds no CPUs, so the training step need not wait for Slurm to release them
    procs=$(srun --overlap --kill-on-bad-exit=1 --nodes="$SLURM_NNODES" --ntasks="$SLURM_NNODES" --ntasks-per-node=1 \
      python -c 'import torch; print(torch.cuda.device_count())' | sort -u) || die "counting GPUs per node failed"
    [ "$(echo "$procs" | wc -l)" -eq 1 ] ||
      die "nodes have different GPU counts ($(echo "$procs" | tr '\n' ' '));" \
        "submit with --gpus-per-node=N or set DISTOPT_PROCS_PER_NODE"
    [ "$procs" -gt 0 ] || procs=2
  fi
  [[ "$procs" =~ ^[1-9][0-9]*$ ]] ||
    die "processes per node: '$procs' is invalid: not a positive integer;" \
      "set DISTOPT_PROCS_PER_NODE to the GPUs per node"
  echo "$procs"
}

# --- NCCL. Site-specific, so left to NCCL's own detection unless exported before sbatch:
#   NCCL_SOCKET_IFNAME  interface(s) for NCCL's bootstrap and socket transport, by prefix: ib0, eth0,
#                       ^docker,lo (NCCL's default skips lo and docker*); GLOO_SOCKET_IFNAME for gloo
#   NCCL_IB_HCA         InfiniBand/RoCE adapters to use, e.g. mlx5_0,mlx5_1 or ^mlx5_4 (default: all)
#   NCCL_IB_DISABLE=1   no InfiniBand/RoCE: NCCL falls back to TCP sockets on NCCL_SOCKET_IFNAME
#   NCCL_IB_TIMEOUT     InfiniBand retry timeout 4.096 us * 2^N (NCCL's default 20); 22 on large fabrics
# Set here:
# WARN prints the cause of an NCCL failure into the job log; INFO also prints the transports chosen
# (NET/IB or NET/Socket), the first thing to check when inter-node bandwidth is low.
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# 1: a failed or timed-out collective aborts its communicator and ends the process, and
# srun --kill-on-bad-exit then ends every other rank: the job stops instead of hanging to its time limit.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
# 1 makes every wait() block the Python thread and raise there after the timeout: a readable traceback
# when debugging a hang, at the cost of overlap. 0 (torch's default) for training.
export TORCH_NCCL_BLOCKING_WAIT=${TORCH_NCCL_BLOCKING_WAIT:-0}
# Process-group timeout in minutes (DeepSpeed reads it): how long a collective may wait for its slowest
# rank before the error handling above ends the job. Longer than DeepSpeed's 10 because one rank may
# legitimately be busy that long (JIT-building DeepSpeed ops, writing an 8B model's checkpoint).
export DEEPSPEED_TIMEOUT=${DEEPSPEED_TIMEOUT:-30}

# --- Preemption (docs/cluster.md). The batch shell takes Slurm's signal (--signal=B:USR1@<s>, scancel
# --signal=USR1 --batch, a preemption's TERM) and passes it to the step it started; the ranks stop at the
# next step boundary with a checkpoint and exit 75 (76: stopped at once, an earlier checkpoint is the
# newest; 77: checkpoint.max_requeues reached). Copies of one signal (scancel --full signals the shell,
# srun and the ranks) count once in the ranks (launcher/preemption.py).
signalled=""
step_pid=""
forward_signal() {
  signalled=$1
  echo "distopt: got SIG$1, passing it to the training step" >&2
  [ -z "$step_pid" ] || kill -s "$1" "$step_pid" 2>/dev/null || true
}

# Wait for the background step through the signals the traps take (each one ends `wait` early); its
# exit code in step_rc. (A zombie still answers kill -0, so the last `wait` reads the real code.)
step_rc=0
wait_for() {
  step_pid=$1
  while :; do
    wait "$step_pid" && step_rc=0 || step_rc=$?
    kill -0 "$step_pid" 2>/dev/null || break
  done
}

# After the step: on the ranks' "stopped, requeue to continue" codes (75, 76) requeue the job, unless the
# batch shell itself was sent TERM (a cancellation, or a preemption that Slurm requeues itself). The
# next run of the job resumes from the newest complete checkpoint (checkpoint.resume: auto).
requeue_after_stop() {
  local rc=$1
  echo "distopt: training step exited with code $rc"
  if { [ "$rc" = 75 ] || [ "$rc" = 76 ]; } && [ "$signalled" != TERM ]; then
    echo "distopt: requeueing job $SLURM_JOB_ID (requeue $((${SLURM_RESTART_COUNT:-0} + 1)))"
    scontrol requeue "$SLURM_JOB_ID" ||
      die "scontrol requeue $SLURM_JOB_ID failed: the cluster must allow requeueing (--requeue, JobRequeue)"
  fi
  exit "$rc"
}
