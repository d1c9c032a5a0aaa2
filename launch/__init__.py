"""How a job starts.

Shell launchers (each prints its usage with --help):
    launch/local.sh       N processes on this machine (torchrun --standalone; the quickstart's)
    launch/torchrun.sh    torchrun on one node or many (rendezvous, node rank, restarts, NIC, timeouts)
    launch/slurm.sbatch   SLURM batch script: srun + torchrun per node, SIGUSR1 before the limit, requeue
    launch/deepspeed.sh   the DeepSpeed launcher with a hostfile (`host slots=N`), validated first
    launch/launcher_options.sh
                          sourced by torchrun.sh and deepspeed.sh: the options they share (rendezvous,
                          NCCL/gloo interfaces, collective timeout, --dry-run, --help), read and checked once

Python helpers:
    python -m launch.plan      dry run: layout, rank map, per-GPU memory, what to change if it does not fit
    python -m launch.slurm     render the batch script from a config and a resource ask; parse SLURM's env
    python -m launch.hostfile  parse and check a DeepSpeed hostfile against a config
Each ends with `raise SystemExit(run(main))` (pretrain/cli.py): their errors (PlanError, SlurmError,
HostfileError, ConfigError) are PretrainErrors, printed as `error: ...` lines with their exit code.
"""
