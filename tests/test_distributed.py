"""DDP, FSDP2 and multi-node runs as users start them: ./torchrun.sh and ./multinode.sh, gloo on CPU.

The reference is one process with batch 64. The sampler interleaves ranks (rank r takes global
positions r, r+W, ...), so W processes with batch 64/W consume the same samples per step, and with
a per-rank mean loss and averaged gradients the weights must agree to float rounding.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from src.checkpoint.checkpointer import load_checkpoint
from tests.helpers import (
    ROOT,
    assert_same_states,
    descendants,
    explain,
    only_run_dir,
    read_metrics,
    run_script,
    running,
    wait_for_line,
)

TOL = 1e-5
EXPERIMENT = """\
__base__: {root}/config/__base__/config.yaml
seed: 0
batch: 64
model:
  name: MLP
  in_features: 16
  hidden: [32, 32]
dataset:
  name: SyntheticClassification
  input_shape: [16]
  train_size: 256  # 4 steps of 64: no padding in training
  val_size: 69     # odd: the second rank's last sample is a padded duplicate
  test_size: 69
optimizer:
  name: SGD
  lr: 0.1
  momentum: 0.9   # optimizer state that FSDP must shard and reshard
gpu:
  device: cpu
logging:
  mlflow: false
  tensorboard: false
  log_frequency: 2
"""

# A model whose forward raises on rank 1 once training is under way (after epoch 1's checkpoint),
# and notes when it did, so the test can time how long the job takes to end after the failure.
FAILING_MODEL = """\
import os
import time

import torch
from torch import nn

from src.registry import MODEL_REGISTRY


@MODEL_REGISTRY.register()
class FailsOnRank1(nn.Module):
    def __init__(self, num_classes: int = 10, in_features: int = 16) -> None:
        super().__init__()
        self.fc = nn.Linear(in_features, num_classes)
        self.train_calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.train_calls += int(self.training)
        if os.environ.get("RANK") == "1" and self.train_calls == 6:  # epoch 2, step 2
            with open(os.environ["FAIL_STAMP"], "w") as f:
                f.write(str(time.time()))
            raise RuntimeError("deliberate failure on rank 1")
        return self.fc(x)
"""


def launcher_env(**extra: str) -> dict[str, str]:
    """The launchers run this interpreter; nothing inherited may look like an enclosing torchrun job."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC_", "MASTER_"))}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK"):
        env.pop(key, None)
    return {**env, "PYTHON": sys.executable, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **extra}


def launch(*args: str, env: dict[str, str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ./torchrun.sh (or another launcher given first) from the repository root.

    The launcher leads its own process group, so a timeout ends its workers too, not only torchrun.
    """
    cmd = list(args) if args[0].startswith("./") else ["./torchrun.sh", *args]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env or launcher_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def kill_group(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """SIGKILL the launcher's group and every worker below it, like a node that died, and wait until
    all are gone (a worker left behind would still hold the run's lock)."""
    workers = descendants(proc.pid)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    for pid in workers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + timeout
    while any(running(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert list(a) == list(b)
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def experiment(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("exp") / "mlp.yaml"
    path.write_text(EXPERIMENT.format(root=ROOT))
    return path


@pytest.fixture(scope="module")
def reference(experiment, tmp_path_factory) -> Path:
    """One process, batch 64, 4 epochs, a checkpoint kept after every epoch."""
    out = tmp_path_factory.mktemp("reference")
    proc = run_script("train.py", str(experiment), f"output={out}", "epoch=4", "checkpoint.save_frequency=1")
    assert proc.returncode == 0, explain(proc)
    run = only_run_dir(out)
    assert "1 process(es)" in proc.stderr
    return run


def epoch_weights(reference: Path, epoch: int) -> dict[str, torch.Tensor]:
    return weights(reference / "checkpoints" / f"epoch_{epoch:04d}.pth")


@pytest.mark.slow
def test_ddp_two_processes_match_one_process(experiment, reference, tmp_path):
    # drop_last changes nothing in training (256 = 4 x 64) and must not cut validation or testing short.
    proc = launch(
        "2",
        "train.py",
        str(experiment),
        f"output={tmp_path}",
        "batch=32",
        "epoch=2",
        "dataloader.drop_last=true",
    )
    assert proc.returncode == 0, explain(proc)
    assert "2 process(es)" in proc.stderr and "batch 32 per process, 64 global" in proc.stderr
    run = only_run_dir(tmp_path)  # rank 0 alone made a directory, and every rank used it
    assert max_diff(weights(run / "checkpoints/last.pth"), epoch_weights(reference, 2)) < TOL

    # Validation over 69 samples on 2 ranks (one padded duplicate) counts each sample once.
    ddp_val = [e for e in read_metrics(run) if "val_accuracy" in e]
    ref_val = [e for e in read_metrics(reference) if "val_accuracy" in e][:2]
    assert [e["val_accuracy"] for e in ddp_val] == [e["val_accuracy"] for e in ref_val]
    assert [e["val_loss"] for e in ddp_val] == pytest.approx([e["val_loss"] for e in ref_val], abs=TOL)

    # The same for testing: the 2-process test at the end of training against test.py in one process.
    distributed = json.loads((run / "test/metrics.json").read_text())
    proc = run_script("test.py", str(run / "config.yaml"))
    assert proc.returncode == 0, explain(proc)
    single = json.loads((run / "test/metrics.json").read_text())
    assert distributed["test_accuracy"] == single["test_accuracy"]
    assert distributed["test_loss"] == pytest.approx(single["test_loss"], abs=TOL)


@pytest.mark.slow
def test_fsdp_matches_one_process_and_resumes_at_other_world_sizes(experiment, reference, tmp_path):
    fsdp = ["distributed.strategy=fsdp", "distributed.fsdp_min_params=100"]
    proc = launch("2", "train.py", str(experiment), f"output={tmp_path}", "batch=32", "epoch=2", *fsdp)
    assert proc.returncode == 0, explain(proc)
    blocks = re.search(r"FSDP2: (\d+) block\(s\) sharded \(full_shard\), mesh \(2,\)", proc.stderr)
    assert blocks and int(blocks.group(1)) == 3, proc.stderr[-3000:]  # the MLP's three Linear layers
    run = only_run_dir(tmp_path)
    last = torch.load(run / "checkpoints/last.pth", weights_only=True)
    assert all(type(t) is torch.Tensor for t in last["model"].values())  # consolidated, not DTensor
    shards = sorted(p.name for p in (run / "checkpoints" / last["dcp"]).glob("*.distcp"))
    assert shards == ["__0_0.distcp", "__1_0.distcp"]  # each rank wrote its own shard
    assert max_diff(last["model"], epoch_weights(reference, 2)) < TOL

    # One process: train.py makes a one-process group itself and reshards the DCP checkpoint.
    change = "checkpoint.allow_config_change=true"
    proc = run_script("train.py", str(run / "config.yaml"), "epoch=3", "batch=64", change)
    assert proc.returncode == 0, explain(proc)
    assert "resumed at epoch 3" in proc.stderr and "mesh (1,)" in proc.stderr
    assert max_diff(weights(run / "checkpoints/last.pth"), epoch_weights(reference, 3)) < TOL

    # And back to two processes.
    proc = launch("2", "train.py", str(run / "config.yaml"), "epoch=4", "batch=32", change)
    assert proc.returncode == 0, explain(proc)
    assert "resumed at epoch 4" in proc.stderr and "mesh (2,)" in proc.stderr
    assert max_diff(weights(run / "checkpoints/last.pth"), epoch_weights(reference, 4)) < TOL
    assert only_run_dir(tmp_path) == run


# An MLP whose training forwards are counted, and DCP's file writer held at chosen steps (DCP_GATE):
# `go_on:<step>`: that step's shards are written on a thread other than training's, and only once
# training has taken the next optimizer step (forward number step+2 began): a save that blocked
# training would never get there (it fails after 120 s), and shards not copied at the save would
# hold the newer weights;
# `hang:<step>`: the shards are written, then the write stalls before rank 0 writes `.metadata`;
# `fail:<step>`: rank 1's write fails.
DCP_GATE = """\
import os
import re
import sys
import threading
import time

import torch.distributed.checkpoint as dcp

from src.models.small import MLP
from src.registry import MODEL_REGISTRY

forwards = 0
write_data = dcp.FileSystemWriter.write_data


def gated_write_data(self, plan, planner):
    step = int(re.search(r"dcp_step_(\\d+)", str(self.path)).group(1))
    gates = {int(at): mode for mode, at in (gate.split(":") for gate in os.environ.get("DCP_GATE", "").split())}
    if gates.get(step) == "go_on":
        if threading.current_thread() is threading.main_thread():
            raise RuntimeError("the shards are written on the training thread")
        deadline = time.monotonic() + 120
        while forwards < step + 2:
            if time.monotonic() > deadline:
                raise RuntimeError("training did not go on while the shards were written")
            time.sleep(0.01)
        print(f"step {step}: training went on during the DCP write", file=sys.stderr, flush=True)
    if gates.get(step) == "fail" and os.environ["RANK"] == "1":
        raise OSError(5, "deliberate write failure")
    written = write_data(self, plan, planner)
    if gates.get(step) == "hang":
        written.wait()
        print(f"step {step}: DCP write in flight", file=sys.stderr, flush=True)
        time.sleep(600)
    return written


dcp.FileSystemWriter.write_data = gated_write_data


@MODEL_REGISTRY.register()
class GatedMLP(MLP):
    def forward(self, x):
        global forwards
        forwards += int(self.training)
        return super().forward(x)
"""


def gated_fsdp_run(experiment: Path, tmp_path: Path) -> list[str]:
    """train.py's arguments for 2 epochs of 4 steps with FSDP2 and GatedMLP, a checkpoint every 2 steps."""
    (tmp_path / "dcp_gate.py").write_text(DCP_GATE)
    return ["train.py", str(experiment), "batch=32", "epoch=2", "checkpoint.save_every_n_steps=2",
            "distributed.strategy=fsdp", "distributed.fsdp_min_params=100", "model.name=GatedMLP",
            "model.in_features=16", "model.hidden=[32,32]", "imports=[dcp_gate]"]  # fmt: skip


@pytest.mark.slow
def test_fsdp_shards_are_written_in_the_background_and_a_sigkill_mid_write_resumes_exactly(
    experiment, tmp_path
):
    """Saves at steps 2, 4 (epoch 1), 6 and 8. Step 4's shards are written only after training went on
    (so the save is asynchronous and its staged copy is what training started from); a SIGKILL while
    step 6's are written keeps step 4's last.pth, and the resumed run ends bit-identical."""
    run_args = gated_fsdp_run(experiment, tmp_path)
    env = launcher_env(PYTHONPATH=str(tmp_path), DCP_GATE="go_on:4")
    proc = launch("2", *run_args, f"output={tmp_path / 'reference'}", env=env)
    assert proc.returncode == 0, explain(proc)
    assert (
        proc.stderr.count("step 4: training went on during the DCP write") == 2
    )  # each rank's writer waited
    reference = only_run_dir(tmp_path / "reference") / "checkpoints"
    want = torch.load(reference / "last.pth", weights_only=True)
    # Pruned as before: the folders still named by a file, each complete, no temporary one left.
    assert {p.name for p in reference.glob("dcp_step_*")} == set(want["dcp_files"].values())
    assert want["dcp_files"]["last.pth"] == want["dcp"] == "dcp_step_00000008"
    assert want["dcp_files"]["previous.pth"] == "dcp_step_00000006"
    assert all((reference / name / ".metadata").is_file() for name in want["dcp_files"].values())
    assert not list(reference.glob(".dcp_step_*"))

    log = tmp_path / "killed.log"
    with open(log, "w") as out:
        killed = subprocess.Popen(
            ["./torchrun.sh", "2", *run_args, f"output={tmp_path / 'killed'}"], cwd=ROOT, stdout=out,
            stderr=subprocess.STDOUT, env={**env, "DCP_GATE": "go_on:4 hang:6"}, start_new_session=True,
        )  # fmt: skip
    try:
        wait_for_line(killed, log, "step 6: DCP write in flight")
    finally:
        kill_group(killed)  # torchrun and both ranks, like a node that died
    run = only_run_dir(tmp_path / "killed")
    ckpt = run / "checkpoints"
    partial = ckpt / ".dcp_step_00000006.tmp"
    assert partial.is_dir() and not (partial / ".metadata").exists(), log.read_text()[-3000:]
    assert not (ckpt / "dcp_step_00000006").exists()
    last = load_checkpoint(ckpt / "last.pth")  # published before step 6's write began, and loadable
    assert last["dcp"] == "dcp_step_00000004" and (ckpt / "dcp_step_00000004" / ".metadata").is_file()

    proc = launch("2", "train.py", str(run / "config.yaml"), env=launcher_env(PYTHONPATH=str(tmp_path)))
    assert proc.returncode == 0, explain(proc)
    assert "resumed at epoch 2, step 4" in proc.stderr and f"removing {partial}" in proc.stderr
    got = torch.load(ckpt / "last.pth", weights_only=True)
    assert_same_states(got, want, ("model", "rng"))
    for shard in ("__0_0.distcp", "__1_0.distcp"):  # the sharded model and optimizer state too
        assert (ckpt / got["dcp"] / shard).read_bytes() == (reference / want["dcp"] / shard).read_bytes()


@pytest.mark.slow
def test_multinode_agents_match_one_process(experiment, reference, tmp_path):
    """Two nodes of one process each on localhost; batch 16 x 2 accumulation also exercises no_sync."""
    endpoint = f"127.0.0.1:{free_port()}"
    args = [
        str(experiment),
        f"output={tmp_path}",
        "batch=16",
        "training.accumulate_grad_batches=2",
        "epoch=2",
    ]
    logs = [tmp_path / "node0.log", tmp_path / "node1.log"]
    agents = [start_agent(node, endpoint, ["train.py", *args], logs[node]) for node in (0, 1)]
    try:
        codes = [agent.wait(timeout=300) for agent in agents]
    finally:
        for agent in agents:
            if agent.poll() is None:
                kill_group(agent)
    output = "\n".join(log.read_text() for log in logs)
    assert codes == [0, 0], output[-6000:]
    assert "batch 16 per process, 64 global (x2 accumulation)" in output
    run = only_run_dir(tmp_path)
    assert max_diff(weights(run / "checkpoints/last.pth"), epoch_weights(reference, 2)) < TOL


def start_agent(node: int, endpoint: str, args: list[str], log: Path) -> subprocess.Popen:
    """One ./multinode.sh agent (2 nodes, 1 process each), its output in `log` so no pipe fills up."""
    with open(log, "w") as out:
        cmd = ["./multinode.sh", "2", "1", "test_job", str(node), endpoint, *args]
        return subprocess.Popen(
            cmd, cwd=ROOT, env=launcher_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


@pytest.fixture
def failing_model(tmp_path) -> dict[str, str]:
    (tmp_path / "fails_on_rank1.py").write_text(FAILING_MODEL)
    return launcher_env(PYTHONPATH=str(tmp_path), FAIL_STAMP=str(tmp_path / "failed_at"))


def failing_run(experiment: Path, output: Path) -> list[str]:
    return ["train.py", str(experiment), f"output={output}", "batch=32", "epoch=2",
            "model=FailsOnRank1", "imports=[fails_on_rank1]"]  # fmt: skip


@pytest.mark.slow
def test_a_failing_rank_ends_the_job_promptly(experiment, failing_model, tmp_path):
    proc = launch("2", *failing_run(experiment, tmp_path / "out"), env=failing_model)
    ended = time.time()
    assert proc.returncode != 0, explain(proc)
    assert ended - float((tmp_path / "failed_at").read_text()) < 60
    assert "deliberate failure on rank 1" in proc.stderr  # the failing rank's own error is shown
    run = only_run_dir(tmp_path / "out")
    assert "run failed" in (run / "train.log").read_text().lower()  # rank 0 notes the failure too
    assert (run / "checkpoints/last.pth").is_file()  # epoch 1's checkpoint is kept


PROBE = """\
import json, os, sys
from pathlib import Path

keys = ["RANK", "WORLD_SIZE", "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_RUN_ID", "OMP_NUM_THREADS"]
seen = {k: os.environ.get(k) for k in keys}
Path(sys.argv[1], f"{seen['RANK']}_{seen['TORCHELASTIC_RESTART_COUNT']}.json").write_text(json.dumps(seen))
sys.exit(1 if seen["TORCHELASTIC_RESTART_COUNT"] == "0" else 0)  # fail the first attempt only
"""


def test_torchrun_sh_passes_restarts_through(tmp_path):
    """A worker that fails on the first attempt succeeds once torchrun restarts it (torch-free, so quick).

    Without restarts the first failure ends the job: test_a_failing_rank_ends_the_job_promptly.
    """
    (tmp_path / "probe.py").write_text(PROBE)
    for case, args, env in [
        ("env", ["2"], launcher_env(MAX_RESTARTS="1")),
        ("option", ["--max-restarts=1", "1"], launcher_env(OMP_NUM_THREADS="")),
    ]:
        seen = tmp_path / case
        seen.mkdir()
        proc = launch(*args, str(tmp_path / "probe.py"), str(seen), env=env)
        assert proc.returncode == 0, explain(proc)
        runs = {p.stem: json.loads(p.read_text()) for p in seen.glob("*.json")}
        world = int(args[-1])
        # Every rank ran again after the restart (on the first attempt, a rank may be stopped before it writes).
        assert {name for name in runs if name.endswith("_1")} == {f"{rank}_1" for rank in range(world)}
        assert any(name.endswith("_0") for name in runs)
        assert len({r["TORCHELASTIC_RUN_ID"] for r in runs.values()}) == 1  # one job across the restart
        assert all(r["WORLD_SIZE"] == str(world) for r in runs.values())
    # Unset OMP_NUM_THREADS: the script gives each process its share of this process's cores.
    assert {r["OMP_NUM_THREADS"] for r in runs.values()} == {str(len(os.sched_getaffinity(0)))}


def test_launchers_reject_bad_arguments():
    """Usage errors end in the shell scripts, before torchrun or Python start."""
    proc = launch("./torchrun.sh", "two", "train.py")
    assert proc.returncode == 2 and "NPROC must be a positive number" in proc.stderr
    proc = launch("./torchrun.sh", "2")
    assert proc.returncode == 2 and "torchrun.sh [TORCHRUN_OPTIONS...] NPROC SCRIPT" in proc.stderr
    proc = launch("./multinode.sh", "2", "1", "job", "2", "127.0.0.1:29500", "train.py")
    assert proc.returncode == 2 and "NODE_RANK must be 0..1" in proc.stderr
    proc = launch("./multinode.sh", "2", "1", "job", "0", "127.0.0.1", "train.py")
    assert proc.returncode == 2 and "HOST:PORT expected" in proc.stderr


def test_slurm_example_starts_one_multinode_agent_per_node(tmp_path):
    """The SLURM script's plumbing, with srun/scontrol stubs and a stand-in multinode.sh that echoes."""
    stubs = {
        "srun": 'while [[ "$1" == --* ]]; do shift; done\nSLURM_NODEID=1 exec "$@"',
        "scontrol": "echo nodeA\necho nodeB",
        "multinode.sh": 'echo "args: $*"\necho "threads: $OMP_NUM_THREADS"',
    }
    for name, body in stubs.items():
        (tmp_path / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (tmp_path / name).chmod(0o755)
    slurm = {"SLURM_JOB_NODELIST": "node[A-B]", "SLURM_JOB_ID": "4242", "SLURM_NNODES": "2",
             "SLURM_GPUS_ON_NODE": "4", "SLURM_CPUS_PER_TASK": "32"}  # fmt: skip
    env = {**os.environ, **slurm, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    proc = subprocess.run(
        ["bash", str(ROOT / "script/slurm_example.sh"), "config/my_exp.yaml", "batch=8"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert proc.returncode == 0, explain(proc)
    # node rank from SLURM_NODEID, the rendezvous on the first node, a port from the job id
    assert "args: 2 4 4242 1 nodeA:24242 train.py config/my_exp.yaml batch=8" in proc.stdout
    assert "threads: 8" in proc.stdout


@pytest.mark.slow
def test_a_failed_fsdp_shard_write_ends_the_run_with_one_line(experiment, tmp_path):
    """Rank 1's DCP write at step 2 fails; the error surfaces at the next save (epoch 1's end)."""
    env = launcher_env(PYTHONPATH=str(tmp_path), DCP_GATE="fail:2")
    proc = launch("2", *gated_fsdp_run(experiment, tmp_path), f"output={tmp_path}", env=env)
    assert proc.returncode != 0, explain(proc)
    # Both ranks end with the same line: rank 0 from its writer thread, rank 1 from its own DCP future.
    failed = r"error: writing checkpoint shards \S+/checkpoints/\.dcp_step_00000002\.tmp failed: OSError: "
    assert len(re.findall(failed + r"\[Errno 5\] deliberate write failure\n", proc.stderr)) == 2, proc.stderr
    assert "[rank0]" not in proc.stderr and "[rank1]" not in proc.stderr  # no worker traceback
    ckpt = only_run_dir(tmp_path) / "checkpoints"
    assert not (ckpt / "last.pth").exists() and not (ckpt / "dcp_step_00000002").exists()  # nothing names it
