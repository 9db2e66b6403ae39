#!/usr/bin/env python3
"""A throwaway single-host Slurm cluster (one or two nodes) for testing the sbatch recipes.

    python3 scripts/slurm_cluster.py up [--nodes 2] [--state DIR]    # prints the state dir and SLURM_CONF
    python3 scripts/slurm_cluster.py down --state DIR

Needs root and Debian's slurmctld, slurmd, slurm-client and munge packages (tested with Slurm 22.05.8, munge
0.5.15). No systemd and no cgroups: munged (as user munge, with its own key and socket), slurmctld and one
slurmd per node run in the foreground, started here, and everything they write (config, spool, state, logs,
pid files) lives in the state directory. `down` cancels every job, then stops each daemon by the pid recorded
at start (SIGTERM, then SIGKILL), and removes the /etc/hosts line that `up` added. The node names
(freeloc-n1, freeloc-n2) must resolve because the sbatch recipes use the first node's name as the torchrun
rendezvous host; `up` appends one tagged line for them to /etc/hosts (edited in place: in containers it is
often a bind mount that cannot be replaced by a rename) and `down` deletes exactly that line.

Only the standard library, so it runs with any python3; tests/test_slurm.py imports it.
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HOSTS = Path("/etc/hosts")
NODE_NAMES = ("freeloc-n1", "freeloc-n2")
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo", "squeue", "scancel")
# How long a requeued job is held before it may start again, and the lifetime of job credentials. Slurm's
# default is 120 s; 10 keeps the preemption test short (it needs a daemon restart to change, hence here).
CRED_EXPIRE_S = 10


class Unavailable(RuntimeError):
    """Slurm cannot run here (not installed, not root, a daemon did not start); the message says why."""


def missing_reason() -> str | None:
    """Why a cluster cannot be started on this machine, or None if it can be tried."""
    absent = [d for d in DAEMONS if shutil.which(d) is None]
    if absent:
        return (f"Slurm/munge not installed (no {', '.join(absent)}); "
                f"apt-get install slurmctld slurmd slurm-client munge")
    if os.geteuid() != 0:
        return "needs root (slurmd runs jobs as the submitting user and must be root)"
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return "no 'munge' user (the munge package creates it)"
    return None


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _detected_cpus() -> int:
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, timeout=30).stdout
    m = re.search(r"\bCPUs=(\d+)", out)
    return int(m.group(1)) if m else 1


def _detected_memory_mb() -> int:
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, timeout=30).stdout
    m = re.search(r"RealMemory=(\d+)", out)
    return int(m.group(1)) if m else 1000


def _hosts_tag(state: Path) -> str:
    return f"# freeloc_dist slurm test cluster {state}"


def _add_hosts_line(state: Path) -> None:
    line = f"127.0.0.1 {' '.join(NODE_NAMES)}  {_hosts_tag(state)}\n"
    text = HOSTS.read_text()
    if _hosts_tag(state) in text:
        return
    with HOSTS.open("a") as f:  # append in place (no rename: /etc/hosts may be a bind mount)
        if text and not text.endswith("\n"):
            f.write("\n")
        f.write(line)


def _remove_hosts_line(state: Path) -> None:
    try:
        text = HOSTS.read_text()
    except OSError:
        return
    kept = [ln for ln in text.splitlines(keepends=True) if _hosts_tag(state) not in ln]
    if len(kept) != len(text.splitlines(keepends=True)):
        with HOSTS.open("r+") as f:  # rewrite in place
            f.seek(0)
            f.write("".join(kept))
            f.truncate()


def write_config(state: Path, nodes: int) -> Path:
    """slurm.conf and the directories it names; returns the config path."""
    ctld_port, *node_ports = _free_ports(1 + nodes)
    host = socket.gethostname().split(".")[0]  # slurmctld checks that SlurmctldHost names this machine
    cpus = _detected_cpus()
    # Every node reports this host's memory; each must claim no more than slurmd -C detects or it drains.
    mem = max(100, _detected_memory_mb() // nodes)
    for d in ("ctld", "log", "run"):
        (state / d).mkdir(exist_ok=True)
    for name in NODE_NAMES[:nodes]:
        (state / f"spool-{name}").mkdir(exist_ok=True)  # slurmd does not create its spool directory
    node_lines = "\n".join(
        f"NodeName={name} NodeAddr=127.0.0.1 NodeHostname={host} Port={port} CPUs={cpus} RealMemory={mem} "
        f"State=UNKNOWN" for name, port in zip(NODE_NAMES, node_ports))
    conf = f"""\
# Written by scripts/slurm_cluster.py for a throwaway test cluster; see that file.
ClusterName=freeloc
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={state / 'munge' / 'munge.socket'},cred_expire={CRED_EXPIRE_S}
StateSaveLocation={state / 'ctld'}
SlurmdSpoolDir={state}/spool-%n
SlurmctldPidFile={state / 'run' / 'slurmctld.pid'}
SlurmdPidFile={state}/run/slurmd-%n.pid
SlurmctldLogFile={state / 'log' / 'slurmctld.log'}
SlurmdLogFile={state}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups and no systemd here: track processes through /proc, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
# Look at pending jobs every 2 s (default 60): a requeued job starts soon after its hold (CRED_EXPIRE_S) ends.
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=2
# Short grace between SIGTERM and SIGKILL when a job is cancelled or a step fails (default 30 s).
KillWait=5
SlurmdTimeout=60
InactiveLimit=0
MinJobAge=600
{node_lines}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""
    path = state / "slurm.conf"
    path.write_text(conf)
    return path


def _record(state: Path, name: str, pid: int) -> None:
    pids_file = state / "pids.json"
    pids = json.loads(pids_file.read_text()) if pids_file.exists() else {}
    pids[name] = pid
    pids_file.write_text(json.dumps(pids, indent=1))


def _spawn(state: Path, name: str, argv: list[str], **kw) -> subprocess.Popen:
    log = open(state / "log" / f"{name}.stdout", "ab")
    # A new session: the daemons outlive the `up` command and its terminal, and are stopped by pid.
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, **kw)
    _record(state, name, proc.pid)
    return proc


def _wait(what: str, ok, timeout: float, state: Path, procs: dict) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, proc in procs.items():
            if proc.poll() is not None:
                raise Unavailable(f"{name} exited with code {proc.returncode} while waiting for {what}: "
                                  f"{_tail(state, name)}")
        if ok():
            return
        time.sleep(0.2)
    raise Unavailable(f"timed out after {timeout:.0f} s waiting for {what}")


def _tail(state: Path, name: str) -> str:
    texts = []
    for f in sorted((state / "log").glob(f"{name}*")):
        lines = f.read_text(errors="replace").strip().splitlines()
        texts.extend(lines[-3:])
    return " | ".join(texts)[-600:]


def client_env(state: Path) -> dict:
    return {**os.environ, "SLURM_CONF": str(state / "slurm.conf")}


def _nodes_idle(state: Path, nodes: int) -> bool:
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True,
                         env=client_env(state), timeout=20).stdout.split()
    states = dict(zip(out[::2], out[1::2]))
    return len(states) == nodes and all(s == "idle" for s in states.values())


def up(state: str | Path | None = None, nodes: int = 1, timeout: float = 60) -> Path:
    """Start munged, slurmctld and `nodes` slurmd's; returns the state directory once every node is idle.
    On any failure everything started is stopped again and Unavailable is raised."""
    if nodes not in (1, 2):
        raise ValueError("nodes must be 1 or 2")
    reason = missing_reason()
    if reason:
        raise Unavailable(reason)
    state = Path(state) if state else Path(tempfile.mkdtemp(prefix="freeloc-slurm-"))
    state.mkdir(parents=True, exist_ok=True)
    state.chmod(0o755)  # munged runs as user munge and must reach its subdirectory
    try:
        _add_hosts_line(state)
        conf = write_config(state, nodes)
        munge_dir = state / "munge"
        munge_dir.mkdir(exist_ok=True)
        munge_dir.chmod(0o755)  # munged: the socket directory must be searchable by all
        munge = pwd.getpwnam("munge")
        key = munge_dir / "munge.key"
        key.write_bytes(os.urandom(1024))  # a key of our own: this cluster trusts no other
        key.chmod(0o600)
        for p in (munge_dir, key):
            os.chown(p, munge.pw_uid, munge.pw_gid)
        procs = {"munged": _spawn(state, "munged", [
            "munged", "-F", f"--socket={munge_dir / 'munge.socket'}", f"--key-file={key}",
            f"--pid-file={munge_dir / 'munged.pid'}", f"--log-file={munge_dir / 'munged.log'}",
            f"--seed-file={munge_dir / 'munged.seed'}"], user=munge.pw_uid, group=munge.pw_gid, extra_groups=[])}
        _wait("the munge socket", (munge_dir / "munge.socket").exists, 20, state, procs)
        env = client_env(state)
        procs["slurmctld"] = _spawn(state, "slurmctld", ["slurmctld", "-D", "-i", "-f", str(conf)], env=env)
        for name in NODE_NAMES[:nodes]:
            procs[f"slurmd-{name}"] = _spawn(state, f"slurmd-{name}", ["slurmd", "-D", "-N", name, "-f", str(conf)],
                                              env=env)
        _wait(f"{nodes} idle node(s)", lambda: _nodes_idle(state, nodes), timeout, state, procs)
    except BaseException:
        down(state)
        raise
    return state


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of this process (when `up` ran in-process) counts as gone once reaped.
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return True


def _stop(pid: int, grace: float = 10) -> None:
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not _alive(pid):
                return
            time.sleep(0.1)


def _cancel_jobs(state: Path, timeout: float = 30) -> None:
    env = client_env(state)

    def jobs() -> list[str]:
        try:
            return subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, env=env,
                                  timeout=10).stdout.split()
        except (OSError, subprocess.SubprocessError):
            return []

    ids = jobs()
    if not ids:
        return
    subprocess.run(["scancel", *ids], env=env, capture_output=True, timeout=20)
    deadline = time.monotonic() + timeout
    while jobs() and time.monotonic() < deadline:
        time.sleep(0.5)


def down(state: str | Path) -> None:
    """Cancel every job, stop every daemon by its pid, remove the /etc/hosts line. Safe to call twice."""
    state = Path(state)
    pids_file = state / "pids.json"
    pids = json.loads(pids_file.read_text()) if pids_file.exists() else {}
    try:
        if "slurmctld" in pids and _alive(pids["slurmctld"]):
            _cancel_jobs(state)  # slurmstepd's outlive slurmd: end the jobs while the cluster can
    finally:
        # Nodes first (they talk to the controller while shutting down), munged last (everyone needs it).
        order = sorted(pids, key=lambda n: (n.startswith("slurmd-") is False, n == "munged"))
        for name in order:
            _stop(pids[name])
        _remove_hosts_line(state)
        if pids_file.exists():
            pids_file.write_text("{}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=["up", "down"])
    p.add_argument("--nodes", type=int, default=1, choices=[1, 2])
    p.add_argument("--state", help="state directory (default for up: a new one under $TMPDIR)")
    args = p.parse_args(argv)
    if args.action == "down":
        if not args.state:
            p.error("down needs --state DIR")
        down(args.state)
        return 0
    try:
        state = up(args.state, args.nodes)
    except Unavailable as e:
        print(f"error: slurm cluster not started: {e}", file=sys.stderr)
        return 1
    print(f"state: {state}\nexport SLURM_CONF={state / 'slurm.conf'}\n"
          f"stop with: python3 {Path(__file__)} down --state {state}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
