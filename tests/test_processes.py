# Copyright (c) the fairseq-moe plugin authors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""A timed-out or interrupted multi-process run leaves no process behind: torchrun
starts its workers in sessions of their own, out of reach of a kill of torchrun or
of its process group (``mt_run.processes``, used by ``run_cli`` and the scripts)."""

import os
import signal
import subprocess
import threading
import time

import psutil
import pytest

from mt_run import processes

from conftest import BIN
from ep_helpers import torchrun

# a torchrun worker that says it started, then sleeps
WORKER = """
import os, sys, time
open(os.path.join(sys.argv[1], str(os.getpid())), "w").close()
time.sleep(600)
"""


def running(pids):
    """Those of ``pids`` still running (a zombie is dead)."""
    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


def workers_after(tmp_path, launch):
    """The worker pids of a 2-process torchrun of :data:`WORKER` that ``launch`` ends
    early, and those of them still running a few seconds later (killed here if so)."""
    script, started = tmp_path / "worker.py", tmp_path / "started"
    script.write_text(WORKER)
    started.mkdir()
    launch(script, started)
    pids = [int(p.name) for p in started.iterdir()]
    deadline = time.monotonic() + 5  # SIGKILL is immediate; their parent may reap late
    while running(pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = running(pids)
    for pid in left:
        os.kill(pid, signal.SIGKILL)  # this test's own leftovers
    return pids, left


@pytest.mark.timeout(120)
def test_a_timed_out_torchrun_leaves_no_worker_running(tmp_path):
    def launch(script, started):
        with pytest.raises(subprocess.TimeoutExpired):
            torchrun(script, started, timeout=15)  # tests' run_cli

    pids, left = workers_after(tmp_path, launch)
    assert len(pids) == 2, "the workers had not started after 15 s"
    assert left == [], "torchrun's workers outlived its timeout"


class Interrupted(BaseException):
    """What pytest-timeout's signal handler raises (``pytest.fail``), in short."""


@pytest.mark.timeout(120)
def test_an_interrupted_wait_leaves_no_worker_running(tmp_path):
    """As when pytest-timeout fails the test: a signal handler raises while
    :func:`processes.run` waits for torchrun, once both workers are up."""

    def interrupt(signum, frame):
        raise Interrupted()

    def launch(script, started):
        main = threading.main_thread().ident

        def when_started():
            deadline = time.monotonic() + 60
            while len(list(started.iterdir())) < 2 and time.monotonic() < deadline:
                time.sleep(0.1)
            signal.pthread_kill(main, signal.SIGUSR1)

        previous = signal.signal(signal.SIGUSR1, interrupt)
        threading.Thread(target=when_started, daemon=True).start()
        try:
            with pytest.raises(Interrupted):
                # fmt: off
                processes.run([BIN / "torchrun", "--standalone", "--nproc_per_node", "2",
                               script, started], timeout=90, capture_output=True)
                # fmt: on
        finally:
            signal.signal(signal.SIGUSR1, previous)

    pids, left = workers_after(tmp_path, launch)
    assert len(pids) == 2
    assert left == [], "torchrun's workers outlived the interrupted wait"


def outlived(pid):
    """``[pid]`` if it still runs 5 s from now (SIGKILL is immediate, not its reaping)."""
    deadline = time.monotonic() + 5
    while running([pid]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return running([pid])


@pytest.mark.timeout(60)
def test_run_together_ends_the_others_when_one_fails_or_time_runs_out(tmp_path):
    """Two agents of one launch: when one fails, its peer would wait for it until its
    own timeout; ``run_together`` kills the peer's whole tree at once instead."""

    def waits(pidfile):
        # a command whose child (the "worker") writes its pid, then sleeps
        return [
            "bash",
            "-c",
            f"sleep 600 & echo $! > {pidfile}.new; echo started; mv {pidfile}.new {pidfile}; wait",
        ]

    def after(pidfile, then):
        # a peer that waits until the worker is there
        return ["bash", "-c", f"while [ ! -s {pidfile} ]; do sleep 0.1; done; {then}"]

    first, second = tmp_path / "first", tmp_path / "second"
    start = time.monotonic()
    ok, failed = processes.run_together([waits(first), after(first, "exit 3")], text=True)
    assert (failed.returncode, ok.returncode) == (3, -9) and ok.stdout == "started\n"
    assert time.monotonic() - start < 20
    assert outlived(int(first.read_text())) == [], "the peer's worker outlived it"

    with pytest.raises(subprocess.TimeoutExpired) as timed_out:
        processes.run_together([waits(second), after(second, "sleep 600")], timeout=6, text=True)
    assert "started" in timed_out.value.output
    assert outlived(int(second.read_text())) == [], "a worker outlived the timeout"
