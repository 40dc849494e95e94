"""A SIGTERM stops a run after the step in progress: a checkpoint at that step, the documented exit status,
and ``--resume`` continues to the same losses as a run never interrupted (one process and two under torchrun)."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_train import TINY, read_metrics, run_train

from crossmae.checkpoint import check_run, latest_checkpoint, load_checkpoint
from crossmae.engine import EXIT_PREEMPTED, StopSignals, shield_workers

ROOT = Path(__file__).resolve().parents[1]
STEPS = 18
# reads every 3 steps, no periodic checkpoint or validation: the only checkpoint before the end is the signal's
COMMON = ["--fused", "--max-steps", str(STEPS), *[f"--{o}" for o in TINY], "--train.ckpt_every=0",
          "--train.val_every=0", "--train.log_every=3"]


# every run of a comparison uses one thread: another thread count sums in another order (last-bit differences)
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def torchrun(port: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]


def signal_mid_run(cmd: list[str], out: Path, min_rows: int = 3, group: bool = False, sig=signal.SIGTERM
                   ) -> tuple[subprocess.CompletedProcess, int]:
    """Start ``cmd``, send ``sig`` once ``min_rows`` metric rows are written (to its whole process group when
    ``group``, as a terminal's Ctrl-C or a scheduler does); (the finished process, rows then)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **ONE_THREAD}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=group)
    metrics = out / "metrics.csv"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) > min_rows:
            break
        time.sleep(0.02)
    rows = len(read_metrics(metrics)) if metrics.is_file() else 0
    if group:
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    output, _ = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(cmd, proc.returncode, output, ""), rows


def assert_same_losses(whole: Path, resumed: Path) -> None:
    a, b = read_metrics(whole / "metrics.csv"), read_metrics(resumed / "metrics.csv")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [str(s) for s in range(1, STEPS + 1)]
    for ra, rb in zip(a, b):
        for col in ra:
            if col.startswith("loss") or col in ("lr", "grad_norm", "skipped"):
                assert ra[col] == rb[col], f"step {ra['step']} {col}: {ra[col]} vs {rb[col]}"


def test_sigterm_checkpoints_the_step_exits_75_and_resume_matches_an_uninterrupted_run(tmp_path):
    whole = tmp_path / "whole"
    done = run_train([*COMMON, "--out-dir", str(whole)], env=ONE_THREAD)
    assert done.returncode == 0, done.stderr[-2000:]

    stopped = tmp_path / "stopped"
    proc, rows_before = signal_mid_run([sys.executable, str(ROOT / "train.py"), *COMMON, "--out-dir", str(stopped)],
                                       stopped)
    assert proc.returncode == EXIT_PREEMPTED, proc.stdout[-3000:]
    found = re.search(r"stopped by SIGTERM at step (\d+)", proc.stdout)
    assert found, proc.stdout[-3000:]
    step = int(found.group(1))
    assert rows_before <= step < STEPS, f"signal after {rows_before} steps, stopped at {step}"
    checks = check_run(stopped)
    assert [c.step for c in checks] == [step] and checks[0].intact
    _, state = load_checkpoint(latest_checkpoint(stopped))
    assert state["step"] == step
    assert [int(r["step"]) for r in read_metrics(stopped / "metrics.csv")] == list(range(1, step + 1))

    resumed = run_train(["--resume", "--out-dir", str(stopped)], env=ONE_THREAD)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"at step {step}" in resumed.stdout
    assert_same_losses(whole, stopped)


def test_a_second_signal_aborts_at_once():
    code = ("import os, signal, time\n"
            "from crossmae.engine import StopSignals\n"
            "with StopSignals() as signals:\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    time.sleep(0.2)\n"
            "    print('first:', signals.received, flush=True)\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    time.sleep(5)\n"
            "    print('still running', flush=True)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert "first: SIGTERM" in result.stdout and "still running" not in result.stdout, result.stdout
    assert result.returncode == -signal.SIGTERM, result.returncode


class SignalsItself(torch.utils.data.Dataset):
    """Each item sends SIGTERM, then SIGINT, to the process reading it (a DataLoader worker)."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> torch.Tensor:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
        return torch.tensor(index)


def test_shielded_data_loader_workers_survive_stop_signals():
    loader = torch.utils.data.DataLoader(SignalsItself(), batch_size=2, num_workers=1)
    with pytest.raises(RuntimeError, match="DataLoader worker"):
        list(loader)  # unshielded, PyTorch's own handler ends a worker on SIGTERM
    with StopSignals() as signals:
        batches = list(shield_workers(torch.utils.data.DataLoader(SignalsItself(), batch_size=2, num_workers=1)))
    assert [b.tolist() for b in batches] == [[0, 1], [2, 3]]
    assert signals.received is None  # a worker's signal is not the main process's


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_to_the_process_group_spares_the_data_loader_workers(tmp_path, sig):
    """Ctrl-C (or a scheduler) reaches every process of the group, DataLoader workers included: they keep serving
    batches while the main process finishes its step and checkpoints."""
    out = tmp_path / "run"
    proc, rows_before = signal_mid_run([sys.executable, str(ROOT / "train.py"), *COMMON, "--data.num_workers=1",
                                        "--out-dir", str(out)], out, group=True, sig=sig)
    assert proc.returncode == EXIT_PREEMPTED, proc.stdout[-3000:]
    found = re.search(rf"stopped by {sig.name} at step (\d+)", proc.stdout)
    assert found and rows_before <= int(found.group(1)) < STEPS, proc.stdout[-3000:]
    assert proc.stdout.count(f"{sig.name} received") == 1, proc.stdout[-3000:]
    assert [c.step for c in check_run(out)] == [int(found.group(1))]


def test_sigterm_to_torchrun_stops_both_processes_at_one_step_and_resume_matches(tmp_path):
    """torchrun forwards SIGTERM to both workers; they agree on the step through the metric reduction."""
    two = [*COMMON, "--data.batch_size=2"]
    whole = tmp_path / "whole"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*torchrun(29571), str(ROOT / "train.py"), *two, "--out-dir", str(whole)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    stopped = tmp_path / "stopped"
    proc, rows_before = signal_mid_run([*torchrun(29572), str(ROOT / "train.py"), *two, "--out-dir", str(stopped)],
                                       stopped)
    found = re.search(r"stopped by SIGTERM at step (\d+)", proc.stdout)
    assert found, proc.stdout[-3000:]
    step = int(found.group(1))
    assert rows_before <= step < STEPS and step % 3 == 0, f"signal after {rows_before} steps, stopped at {step}"
    assert f"exit {EXIT_PREEMPTED}" in proc.stdout
    checks = check_run(stopped)
    assert [c.step for c in checks] == [step] and checks[0].intact

    resumed = subprocess.run([*torchrun(29573), str(ROOT / "train.py"), "--resume", "--out-dir", str(stopped)],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_losses(whole, stopped)
