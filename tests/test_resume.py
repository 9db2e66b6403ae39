"""Checkpoint and resume: a render stopped by SIGTERM (exit 75, checkpoint written) or killed outright
(SIGKILL, periodic checkpoint) and then resumed gives exactly the latents of an uninterrupted render, and a
stopped render leaves nothing under the output name."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from freeloc_dist.cli import EXIT_PREEMPTED
from freeloc_dist.config import REPO_ROOT

GENERATE = REPO_ROOT / "launch" / "generate.py"
STEPS = 6
# Runs generate.py with every transformer call slowed down, so a signal lands mid-render deterministically.
SLOW = """
import runpy, sys, time
import freeloc_dist.sampling as s
real = s.predict_noise
def slow(*a, **k):
    time.sleep(0.4)
    return real(*a, **k)
s.predict_noise = slow
sys.argv = [sys.argv[1]] + sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def base_args(tmp_path, name):
    return ["--config", "configs/tiny-random.yaml", "--profile", "none", "--frames", "9", "--height", "32",
            "--width", "48", "--steps", str(STEPS), "--seed", "5", "--out", str(tmp_path / f"{name}.mp4"),
            "--save-latents", str(tmp_path / f"{name}.safetensors")]


def env():
    e = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    e["OMP_NUM_THREADS"] = "1"
    return e


def run(args, timeout=240):
    return subprocess.run([sys.executable, str(GENERATE), *args], cwd=REPO_ROOT, env=env(), capture_output=True,
                          text=True, timeout=timeout)


def start_slow_and_signal(args, sig, after_step):
    """Start a slowed render, send `sig` once it reports step `after_step`; returns (returncode, stderr)."""
    proc = subprocess.Popen([sys.executable, "-c", SLOW, str(GENERATE), *args], cwd=REPO_ROOT, env=env(),
                            stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    seen = []
    deadline = time.monotonic() + 240
    for line in proc.stderr:
        seen.append(line)
        if line.startswith(f"step {after_step}/"):
            proc.send_signal(sig)
            break
        assert time.monotonic() < deadline, "".join(seen)
    rest, _ = proc.communicate(timeout=240)[::-1]
    return proc.returncode, "".join(seen) + rest


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    proc = run(base_args(tmp, "ref"))
    assert proc.returncode == 0, proc.stderr
    return load_file(tmp / "ref.safetensors")["latents"]


@pytest.mark.cli
def test_sigterm_checkpoints_exits_75_and_resume_matches(tmp_path, reference):
    args = base_args(tmp_path, "a")
    code, stderr = start_slow_and_signal(args, signal.SIGTERM, after_step=2)
    assert code == EXIT_PREEMPTED, stderr
    assert "preempted after step" in stderr
    assert not (tmp_path / "a.mp4").exists() and not (tmp_path / "a.safetensors").exists()
    ckpt = tmp_path / ".a.mp4.ckpt"
    assert ckpt.is_file()
    assert 2 <= torch.load(ckpt, weights_only=True)["step"] < STEPS
    proc = run([*args, "--resume"])
    assert proc.returncode == 0, proc.stderr
    assert "resuming after step" in proc.stderr
    assert torch.equal(load_file(tmp_path / "a.safetensors")["latents"], reference)
    assert not ckpt.exists()  # removed once the output is complete
    assert (tmp_path / "a.json").is_file()


@pytest.mark.cli
def test_sigkill_then_resume_from_periodic_checkpoint_matches(tmp_path, reference):
    args = [*base_args(tmp_path, "b"), "--checkpoint-every", "2"]
    code, stderr = start_slow_and_signal(args, signal.SIGKILL, after_step=3)
    assert code == -signal.SIGKILL, stderr
    assert not (tmp_path / "b.mp4").exists()
    assert torch.load(tmp_path / ".b.mp4.ckpt", weights_only=True)["step"] in (2, 4)
    proc = run([*args, "--resume"])
    assert proc.returncode == 0, proc.stderr
    assert torch.equal(load_file(tmp_path / "b.safetensors")["latents"], reference)


@pytest.mark.cli
def test_resume_rejects_checkpoint_of_another_render(tmp_path):
    from freeloc_dist.checkpoint import Checkpoint, save_checkpoint

    args = base_args(tmp_path, "c")
    save_checkpoint(tmp_path / ".c.mp4.ckpt", Checkpoint(step=1, total_steps=STEPS, latents=torch.zeros(1),
                                                         scheduler={}, rng=torch.get_rng_state(), fingerprint="x"))
    proc = run([*args, "--resume"])
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().startswith("error: checkpoint ") and "different render" in proc.stderr
    (tmp_path / ".c.mp4.ckpt").write_bytes(b"not a checkpoint")
    proc = run([*args, "--resume"])
    assert proc.returncode == 2 and "cannot read" in proc.stderr, proc.stderr
    assert not (tmp_path / "c.mp4").exists()


@pytest.mark.unit
def test_scheduler_state_round_trip_continues_identically():
    """Unit level: UniPC's multistep history survives a save/load between steps."""
    import diffusers

    from freeloc_dist.checkpoint import load_scheduler_state, scheduler_state

    def make():
        s = diffusers.UniPCMultistepScheduler.from_pretrained(REPO_ROOT / "assets" / "tiny-wan", subfolder="scheduler")
        s.set_timesteps(5)
        return s

    x0 = torch.randn(1, 4, 2, 3, 3, generator=torch.Generator().manual_seed(0))
    flow = lambda x, t: torch.sin(x * (t / 1000.0 + 1))  # noqa: E731  a deterministic stand-in model
    a, xa = make(), x0.clone()
    for t in a.timesteps:
        xa = a.step(flow(xa, t), t, xa, return_dict=False)[0]
    b, xb = make(), x0.clone()
    for t in b.timesteps[:3]:
        xb = b.step(flow(xb, t), t, xb, return_dict=False)[0]
    state = scheduler_state(b)
    c = make()
    load_scheduler_state(c, state, "cpu")
    for t in c.timesteps[3:]:
        xb = c.step(flow(xb, t), t, xb, return_dict=False)[0]
    assert torch.equal(xa, xb)


SLOW_RANKS = """
import os, runpy, sys, time
import freeloc_dist.parallel.engine as engine
real = engine.SequenceParallel.predict
def slow(self, *a, **k):
    time.sleep(0.4)
    return real(self, *a, **k)
engine.SequenceParallel.predict = slow
os.write(2, f"TEST_PID {os.environ['RANK']} {os.getpid()}\\n".encode())  # one write: ranks share stderr
sys.argv = [sys.argv[1]] + sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.dist
def test_sigterm_on_one_rank_stops_every_rank_and_resumes(tmp_path, reference):
    """Under torchrun, a signal seen by rank 1 only: the ranks agree at the step boundary, rank 0 writes the
    checkpoint, every rank exits 75; a single process then resumes it (a different world size)."""
    from _tiny import rel_err

    harness = tmp_path / "slow.py"
    harness.write_text(SLOW_RANKS)
    args = base_args(tmp_path, "d")
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(harness), str(GENERATE), *args], cwd=REPO_ROOT, env=env(), stderr=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    seen, pids = [], {}
    for line in proc.stderr:
        seen.append(line)
        # Both ranks write to one pipe, so a marker may share a line with the other rank's output.
        for rank, pid in re.findall(r"TEST_PID (\d+) (\d+)", line):
            pids[rank] = int(pid)
        if "step 2/" in line and "1" in pids:
            os.kill(pids["1"], signal.SIGTERM)
            break
    rest = proc.communicate(timeout=240)[1]
    stderr = "".join(seen) + rest
    assert proc.returncode != 0
    assert "[rank 0] stopped: preempted after step" in stderr and "[rank 1] stopped: preempted after step" in stderr
    assert "exitcode  : 75" in stderr, stderr[-3000:]  # torchrun's failure report names the workers' code
    assert not (tmp_path / "d.mp4").exists()
    assert (tmp_path / ".d.mp4.ckpt").is_file()
    resumed = run([*args, "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert rel_err(load_file(tmp_path / "d.safetensors")["latents"], reference) < 1e-5
