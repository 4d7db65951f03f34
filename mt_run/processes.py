# MIT License
# Copyright (c) the fairseq-moe plugin authors
"""Commands whose whole process tree ends with them: torchrun and what launches it.

torchrun starts each worker in a session of its own (torch's elastic
``SubprocessHandler``), so killing torchrun, or its process group, leaves the
workers running: a timed-out test or script left them training, holding CPU
cores and ports, with nobody to wait for them. :func:`run` is ``subprocess.run``
for such commands, :func:`kill_tree` what it does on a timeout, :func:`run_together`
several such commands at once (the agents of a multi-node launch), :func:`free_port`
a port for their rendezvous; the tests
(``run_cli``, ``run_sh``), ``scripts/fault_run.py`` and ``scripts/bench_perf.py``
use them.
"""

import os
import signal
import socket
import subprocess
import tempfile
import time

import psutil


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the OS's pick): for a
    launch's rendezvous, or as a port that refuses connections."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_tree(pid: int) -> None:
    """SIGKILL process ``pid`` and every process below it, as a crashed machine would.

    Each process is stopped before its children are listed, so that none starts
    another unseen, and the whole tree is listed before anything is killed (a killed
    parent's children are adopted by init and are no longer below it). The process
    groups led by a process of the tree (the command's own when it was started with
    ``start_new_session``, torchrun's workers') are killed too, with any member that
    left the tree before.
    """
    try:
        todo = [psutil.Process(pid)]
    except psutil.NoSuchProcess:
        return
    tree = {}
    while todo:
        p = todo.pop()
        if p.pid in tree:
            continue
        try:
            p.suspend()
            tree[p.pid] = p
            todo.extend(p.children())
        except psutil.NoSuchProcess:
            pass
    leaders = set()
    for p in tree.values():
        try:
            if os.getpgid(p.pid) == p.pid:
                leaders.add(p.pid)
            p.kill()
        except (psutil.NoSuchProcess, ProcessLookupError):
            pass
    for group in leaders:
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass
    # (no waiting here: reaping the caller's own child would rob its Popen of the exit
    # status, -9; the others are reaped by whoever adopted them)


def run(
    cmd, timeout=None, input=None, capture_output=False, **popen
) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, ...)`` for a command that starts processes of its own.

    The command runs in a session of its own. When ``timeout`` (seconds) passes, or
    anything interrupts the wait (Ctrl-C, pytest-timeout's signal), its whole tree is
    killed (:func:`kill_tree`) before the exception goes on: ``subprocess.TimeoutExpired``
    with the output so far, as from ``subprocess.run``.

    Args:
        cmd: the command (a list).
        timeout (float, optional): seconds before the tree is killed.
        input: sent to its standard input.
        capture_output (bool): collect stdout and stderr, as ``subprocess.run``.
        popen: more ``subprocess.Popen`` arguments (``text``, ``env``, ``cwd``, ...).
    """
    if capture_output:
        popen.update(stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if input is not None:
        popen["stdin"] = subprocess.PIPE
    with subprocess.Popen(cmd, start_new_session=True, **popen) as proc:
        try:
            stdout, stderr = proc.communicate(input, timeout=timeout)
        except BaseException:
            kill_tree(proc.pid)
            proc.wait()
            raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def run_together(cmds, timeout=None, text=False, **popen) -> list:
    """:func:`run` for several commands at once, e.g. the torchrun agents of two nodes.

    Each command runs in a session of its own, its stdout and stderr collected in
    temporary files (no pipe fills while another command is waited for). When one
    exits with an error, the others' trees are killed: an agent whose peer is gone
    would wait for it until its own timeout. When ``timeout`` passes, or anything
    interrupts the wait, every tree is killed before the exception goes on:
    ``subprocess.TimeoutExpired`` with every command's output so far, one after the
    other under a line naming the command.

    Args:
        cmds: the commands (lists).
        timeout (float, optional): seconds for all of them together.
        text (bool): decode the output.
        popen: more ``subprocess.Popen`` arguments (``env``, ``cwd``, ...).

    Returns:
        a ``subprocess.CompletedProcess`` per command, in order (``-9``: killed).
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    procs, files = [], []

    def read(f):
        f.seek(0)
        data = f.read()
        return data.decode(errors="replace") if text else data

    def joined(which):
        parts = []
        for cmd, pair in zip(cmds, files):
            head = f"--- {' '.join(map(str, cmd))}\n"
            parts += [head if text else head.encode(), read(pair[which])]
        return ("" if text else b"").join(parts)

    try:
        for cmd in cmds:
            files.append((tempfile.TemporaryFile(), tempfile.TemporaryFile()))
            out, err = files[-1]
            procs.append(
                subprocess.Popen(cmd, start_new_session=True, stdout=out, stderr=err, **popen)
            )
        while None in [p.poll() for p in procs]:  # (each polled: none short-circuited)
            if any(p.returncode for p in procs):  # one failed: end the others
                for p in procs:
                    if p.returncode is None:
                        kill_tree(p.pid)
                        p.wait()
                break
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(cmds, timeout, output=joined(0), stderr=joined(1))
            time.sleep(0.2)
        return [
            subprocess.CompletedProcess(p.args, p.returncode, read(out), read(err))
            for p, (out, err) in zip(procs, files)
        ]
    except BaseException:
        for p in procs:
            if p.returncode is None:  # (a reaped pid may be another process's now)
                kill_tree(p.pid)
        for p in procs:
            p.wait()
        raise
    finally:
        for pair in files:
            for f in pair:
                f.close()
