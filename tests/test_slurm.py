"""Rank detection under Slurm's srun: tasks join one job from SLURM_* variables, or the stage refuses."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import dist

ROOT = Path(__file__).resolve().parent.parent
SLURM_VARS = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_STEP_ID", "SLURM_STEPID", "SLURM_JOB_ID",
              "SLURM_NODELIST", "SLURM_JOB_NODELIST", "SLURM_STEP_NODELIST", "SLURM_STEP_NUM_TASKS", "SLURM_NPROCS")


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in SLURM_VARS and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                                                "PIPELINE_LAUNCHER")}
    return {**env, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu", **extra}


def test_first_host_of_a_node_list():
    assert dist.first_slurm_host("node[01-03,07],gpu5") == "node01"
    assert dist.first_slurm_host("gpu5,gpu6") == "gpu5"
    assert dist.first_slurm_host("a[7]-ib") == "a7-ib"
    assert dist.first_slurm_host("") is None


def test_which_environments_need_slurm_ranks():
    step = {"SLURM_PROCID": "1", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "SLURM_STEP_ID": "0",
            "SLURM_JOB_ID": "123", "SLURM_JOB_NODELIST": "node[3-4]"}
    assert dist.slurm_rank_env(step) == {"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1",
                                         "MASTER_ADDR": "node3", "MASTER_PORT": str(10000 + 123)}
    assert dist.slurm_rank_env({**step, "RANK": "1"}) is None  # a launcher per node already set the ranks
    assert dist.slurm_rank_env({k: v for k, v in step.items() if k != "SLURM_STEP_ID"}) is None  # batch script
    assert dist.slurm_rank_env({**step, "SLURM_NTASKS": "1"}) is None
    assert dist.slurm_rank_env({}) is None
    with pytest.raises(dist.SlurmError, match="MASTER_ADDR"):
        dist.slurm_rank_env({k: v for k, v in step.items() if k != "SLURM_JOB_NODELIST"})


@pytest.mark.integration
def test_two_cpu_tasks_join_one_job():
    """Two processes with only srun's variables form one gloo group of two ranks through the stages' own path."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = ("import json, torch, torch.distributed as d\n"
            "from pipeline import dist\n"
            "assert dist.adopt_slurm()\n"
            "from pipeline.engine import init_distributed\n"
            "name = init_distributed()\n"
            "t = torch.tensor([float(d.get_rank() + 1)])\n"
            "d.all_reduce(t)\n"
            "print('RESULT', json.dumps({'launcher': name, 'rank': d.get_rank(), 'world': d.get_world_size(), "
            "'local': dist.local_rank(), 'sum': t.item()}))\n"
            "dist.shutdown()\n")
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=_clean_env(SLURM_PROCID=str(r), SLURM_NTASKS="2", SLURM_LOCALID=str(r),
                                             SLURM_STEP_ID="0", SLURM_JOB_ID="777", SLURM_NODELIST="localhost",
                                             MASTER_PORT=str(port)))
             for r in range(2)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
        outs.append(json.loads(next(ln for ln in out.splitlines() if ln.startswith("RESULT"))[7:]))
    assert sorted(o["rank"] for o in outs) == [0, 1]
    assert all(o["world"] == 2 and o["sum"] == 3.0 and o["launcher"] == "slurm" for o in outs)
    assert sorted(o["local"] for o in outs) == [0, 1]


def test_stage_refuses_tasks_without_rendezvous(tiny_run):
    results, run = tiny_run
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "pretrain.py"), "--run", run, "--preset", "tiny",
                        "--results_dir", str(results)], capture_output=True, text=True, timeout=120,
                       env=_clean_env(SLURM_PROCID="0", SLURM_NTASKS="2", SLURM_LOCALID="0", SLURM_STEP_ID="0"))
    assert p.returncode == 2 and "MASTER_ADDR" in p.stderr and "Traceback" not in p.stderr
    assert not (results / run / "02_pretrain").exists()
