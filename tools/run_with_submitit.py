#!/usr/bin/env python
"""Train on a Slurm cluster through submitit: N nodes x G GPUs, one task per GPU.

    pip install submitit        # or: pip install -e ".[slurm]"
    python tools/run_with_submitit.py --nodes 2 --gpus-per-node 8 --partition PART \\
        --timeout 4320 --job-dir /shared/dab_detr/run1 \\
        -- --config-file configs/COCO-Detection/dab_detr_R_50_50ep.yaml [KEY VALUE ...]

Everything after ``--`` is ``train_net.py``'s command line (``--num-gpus``, ``--num-machines``,
``--machine-rank`` and ``--dist-url`` come from the job and are not given). The inputs are
checked here, before anything is queued. ``OUTPUT_DIR`` defaults to ``--job-dir``, which must
be on a file system every node sees (submitit keeps the job's pickles and logs there).

Each of the ``nodes x gpus-per-node`` tasks runs one worker
(:func:`dab_detr.engine.launch.run_worker`): its rank, its machine and the first node's
address come from the job's environment (``SLURM_PROCID``, ``SLURM_LOCALID``,
``SLURM_NODEID``, ``SLURM_JOB_NODELIST``, read by :class:`submitit.JobEnvironment`); NCCL joins
them at ``tcp://<first node>:<port>``, the port derived from the job id. When Slurm preempts
the job or its time runs out, submitit requeues it and the tasks resume from the last
checkpoint (train_net's ``--resume``: data order and optimizer as if never stopped).
"""

import argparse
import os
import sys
from dataclasses import dataclass
from typing import List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import train_net  # noqa: E402  (first dab_detr import: prepares Detectron2's)
from dab_detr.engine.launch import run_worker  # noqa: E402

PORT_BASE, PORT_RANGE = 20000, 20000  # the rendezvous port: PORT_BASE + job id % PORT_RANGE


@dataclass(frozen=True)
class Placement:
    """Where one task of the job runs, in train_net's terms."""

    num_machines: int
    machine_rank: int
    num_gpus: int  # per machine
    local_rank: int
    dist_url: str

    @property
    def world_size(self) -> int:
        return self.num_machines * self.num_gpus


def placement(job_env) -> Placement:
    """The task's placement from a ``submitit.JobEnvironment`` (or anything with its
    ``job_id``, ``num_nodes``, ``node``, ``num_tasks``, ``local_rank``, ``hostnames``)."""
    if job_env.num_tasks % job_env.num_nodes:
        raise ValueError(f"{job_env.num_tasks} tasks on {job_env.num_nodes} nodes: every node "
                         "needs the same number of tasks (one per GPU)")
    job_id = int(str(job_env.job_id).split("_")[0])  # an array job's id is <job>_<task>
    port = PORT_BASE + job_id % PORT_RANGE
    return Placement(num_machines=job_env.num_nodes, machine_rank=job_env.node,
                     num_gpus=job_env.num_tasks // job_env.num_nodes,
                     local_rank=job_env.local_rank,
                     dist_url=f"tcp://{job_env.hostnames[0]}:{port}")


class Task:
    """What submitit runs in every task: this task's train_net worker."""

    def __init__(self, train_args: argparse.Namespace):
        self.train_args = train_args

    def __call__(self) -> None:
        import submitit

        where = placement(submitit.JobEnvironment())
        args = argparse.Namespace(**vars(self.train_args))
        args.num_machines, args.machine_rank = where.num_machines, where.machine_rank
        args.num_gpus, args.dist_url = where.num_gpus, where.dist_url
        run_worker(where.local_rank, train_net.main, where.world_size, where.num_gpus,
                   where.machine_rank, where.dist_url, args=(args,))

    def checkpoint(self):
        """submitit calls this on preemption or timeout: requeue, resuming."""
        import submitit

        args = argparse.Namespace(**vars(self.train_args))
        args.resume = True
        return submitit.helpers.DelayedSubmission(Task(args))


def parse(argv: Optional[List[str]] = None):
    """``(slurm options, train_net arguments)``."""
    argv = sys.argv[1:] if argv is None else argv
    if "--" in argv:
        i = argv.index("--")
        ours, theirs = argv[:i], argv[i + 1:]
    else:
        ours, theirs = argv, []
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--cpus-per-gpu", type=int, default=10)
    parser.add_argument("--partition", help="Slurm partition")
    parser.add_argument("--timeout", type=int, default=60 * 72, help="minutes per job")
    parser.add_argument("--job-dir", required=True,
                        help="submitit's folder (logs, pickles); OUTPUT_DIR by default")
    parser.add_argument("--name", default="dab_detr")
    parser.add_argument("--slurm", nargs="*", default=[], metavar="KEY=VALUE",
                        help="more sbatch options, e.g. constraint=volta32gb qos=high")
    slurm = parser.parse_args(ours)
    train_args = train_net.argument_parser().parse_args(theirs)
    for flag, value in (("--num-gpus", train_args.num_gpus != 1),
                        ("--num-machines", train_args.num_machines != 1),
                        ("--machine-rank", train_args.machine_rank != 0)):
        if value:
            parser.error(f"{flag} comes from the job (--nodes, --gpus-per-node); leave it out")
    if "OUTPUT_DIR" not in train_args.opts[::2]:
        train_args.opts += ["OUTPUT_DIR", slurm.job_dir]
    return slurm, train_args


def executor_parameters(slurm: argparse.Namespace) -> dict:
    """``AutoExecutor.update_parameters`` of the job: one task per GPU."""
    extra = dict(item.split("=", 1) for item in slurm.slurm)
    params = dict(name=slurm.name, nodes=slurm.nodes, gpus_per_node=slurm.gpus_per_node,
                  tasks_per_node=slurm.gpus_per_node, cpus_per_task=slurm.cpus_per_gpu,
                  timeout_min=slurm.timeout, slurm_signal_delay_s=120,
                  slurm_additional_parameters=extra)
    if slurm.partition:
        params["slurm_partition"] = slurm.partition
    return params


def main(argv: Optional[List[str]] = None) -> None:
    try:
        import submitit
    except ImportError:
        raise SystemExit("tools/run_with_submitit.py needs submitit: pip install submitit "
                         "(or pip install -e '.[slurm]')") from None
    slurm, train_args = parse(argv)
    with train_net.report_user_errors("run_with_submitit.py", debug=train_args.debug):
        train_net.load_config(train_args)  # a bad input stops here, not in a queued job
    executor = submitit.AutoExecutor(folder=os.path.join(slurm.job_dir, "%j"),
                                     slurm_max_num_timeout=30)
    executor.update_parameters(**executor_parameters(slurm))
    job = executor.submit(Task(train_args))
    print(f"submitted job {job.job_id}: logs in {slurm.job_dir}/{job.job_id}, "
          f"OUTPUT_DIR {train_args.opts[train_args.opts.index('OUTPUT_DIR') + 1]}")


if __name__ == "__main__":
    main()
