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
