"""``tools/run_with_submitit.py`` with a fake Slurm environment, not a cluster: the command
line, the job's parameters, each task's placement read from the ``SLURM_*`` variables through
submitit, and two tasks (two "nodes" of one GPU each, here two CPU processes over gloo) that
join one process group with the ranks and machine groups train_net's workers get. Training
across machines itself is ``tests/test_train_net_multiprocess.py``'s two-machine test (the same
worker, :func:`dab_detr.engine.launch.run_worker`).
"""

import json
import os
import random
import socket
import subprocess
import sys

import pytest

from conftest import REPO, SHAPES_CONFIG

sys.path.insert(0, os.path.join(REPO, "tools"))
import run_with_submitit as tool  # noqa: E402

submitit = pytest.importorskip("submitit")


def _slurm_env(job_id: int, nodes: str, num_nodes: int, num_tasks: int, proc: int,
               node: int, local: int) -> dict:
    return {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": str(job_id),
            "SLURM_JOB_NUM_NODES": str(num_nodes), "SLURM_NTASKS": str(num_tasks),
            "SLURM_JOB_NODELIST": nodes, "SLURM_PROCID": str(proc), "SLURM_NODEID": str(node),
            "SLURM_LOCALID": str(local)}


def test_command_line_splits_at_the_double_dash_and_defaults_output_dir(tmp_path):
    slurm, args = tool.parse(["--nodes", "4", "--gpus-per-node", "8", "--partition", "p",
                              "--job-dir", str(tmp_path), "--slurm", "constraint=volta32gb",
                              "--", "--config-file", SHAPES_CONFIG, "SOLVER.IMS_PER_BATCH", "64"])
    assert args.config_file == SHAPES_CONFIG and not args.resume
    assert args.opts == ["SOLVER.IMS_PER_BATCH", "64", "OUTPUT_DIR", str(tmp_path)]
    assert tool.executor_parameters(slurm) == dict(
        name="dab_detr", nodes=4, gpus_per_node=8, tasks_per_node=8, cpus_per_task=10,
        timeout_min=4320, slurm_signal_delay_s=120,
        slurm_additional_parameters={"constraint": "volta32gb"}, slurm_partition="p")
    _, args = tool.parse(["--job-dir", str(tmp_path), "--", "--config-file", SHAPES_CONFIG,
                          "OUTPUT_DIR", "elsewhere"])
    assert args.opts == ["OUTPUT_DIR", "elsewhere"]
    with pytest.raises(SystemExit):
        tool.parse(["--job-dir", str(tmp_path), "--", "--num-gpus", "8"])


def test_placement_of_a_task_from_the_slurm_environment(monkeypatch):
    # task 13 of 16: the second GPU... of node 1 of 2 (8 tasks per node), in array job 4242_3
    for key, value in _slurm_env(4242, "gpu[07-08]", 2, 16, 13, 1, 5).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("SLURM_JOB_ID", "4242_3")
    where = tool.placement(submitit.JobEnvironment())
    assert where == tool.Placement(num_machines=2, machine_rank=1, num_gpus=8, local_rank=5,
                                   dist_url="tcp://gpu07:24242")
    assert where.world_size == 16


def test_resubmission_resumes(tmp_path):
    _, args = tool.parse(["--job-dir", str(tmp_path), "--", "--config-file", SHAPES_CONFIG])
    delayed = tool.Task(args).checkpoint()
    requeued = delayed.function
    assert requeued.train_args.resume and not args.resume
    assert requeued.train_args.opts == args.opts


def _free_rendezvous_port() -> int:
    """A free port the tool's rule (20000 + job id % 20000) can give."""
    for port in random.Random().sample(range(tool.PORT_BASE, tool.PORT_BASE + tool.PORT_RANGE),
                                       200):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port")


# each task: the tool's Task, with train_net.main replaced by a probe of the process group
TASK = """
import json, sys
sys.path.insert(0, {tools!r})
import torch, torch.distributed as dist
import run_with_submitit as tool
from detectron2.utils import comm

def probe(args):
    total = torch.tensor([float(comm.get_rank())])
    dist.all_reduce(total)
    out = {{"rank": comm.get_rank(), "world": comm.get_world_size(),
           "local_rank": comm.get_local_rank(), "local_size": comm.get_local_size(),
           "sum_of_ranks": total.item(), "machine_rank": args.machine_rank,
           "num_machines": args.num_machines, "num_gpus": args.num_gpus,
           "dist_url": args.dist_url, "output_dir": args.opts[-1]}}
    with open({out!r} + f"/task{{comm.get_rank()}}.json", "w") as f:
        json.dump(out, f)

tool.train_net.main = probe
_, args = tool.parse(["--job-dir", {out!r}, "--", "--config-file", {config!r}])
tool.Task(args)()
"""


def test_two_tasks_on_two_nodes_join_one_process_group(tmp_path):
    port = _free_rendezvous_port()
    job_id = 100000 + port - tool.PORT_BASE  # 20000 + job id % 20000 == port
    code = TASK.format(tools=os.path.join(REPO, "tools"), out=str(tmp_path),
                       config=SHAPES_CONFIG)
    procs = []
    for rank in range(2):
        env = {**os.environ, **_slurm_env(job_id, "localhost,localhost", 2, 2, rank, rank, 0),
               "CUDA_VISIBLE_DEVICES": ""}  # CPU tasks over gloo, even on a GPU machine
        procs.append(subprocess.Popen([sys.executable, "-c", code], env=env, cwd=REPO,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    for proc in procs:
        output, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, output[-3000:]
    for rank in range(2):
        got = json.loads((tmp_path / f"task{rank}.json").read_text())
        assert got == {"rank": rank, "world": 2, "local_rank": 0, "local_size": 1,
                       "sum_of_ranks": 1.0, "machine_rank": rank, "num_machines": 2,
                       "num_gpus": 1, "dist_url": f"tcp://localhost:{port}",
                       "output_dir": str(tmp_path)}
