# Copyright (c) the fairseq-moe plugin authors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""A run that stops mid-epoch exits 0: fairseq's prefetch thread is stopped
before the interpreter finalises (it used to abort with ``terminate called
without an active exception``, exit 134)."""

import subprocess
import sys
import textwrap

import pytest
import torch
from fairseq.data import iterators

from user import clean_exit

from conftest import REPO, cli_env

# The shape of a --max-update run: the main thread takes a batch and leaves while
# the prefetch thread makes the next ones, each one torch call (~50 ms, without the
# GIL). The crash needs that thread to wake into a finalising interpreter: it used to
# depend on how long finalisation took; here a __del__ run during finalisation lets
# other threads run for a second (as any I/O in a __del__ can), so without the fix the
# thread wakes then, every time, and dies inside torch's C++ frames.
SCRIPT = textwrap.dedent(
    """
    import sys, time, torch
    sys.path.insert(0, {repo!r})
    import user  # the plugin, as --user-dir imports it
    from fairseq.data import iterators

    class Batches:
        def __len__(self):
            return 1000
        def __iter__(self):
            a = torch.randn(800, 800) / 30
            for _ in range(1000):
                yield a @ a

    class LetsOtherThreadsRunAtExit:
        def __del__(self, sleep=time.sleep):
            sleep(1.0)

    at_exit = LetsOtherThreadsRunAtExit()
    it = iterators.BufferedIterator(100, Batches())
    next(it)
    print("done", flush=True)
    """
)


class Batches:
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __iter__(self):
        for i in range(self.n):
            yield torch.full((2,), float(i))


def test_prefetch_threads_are_the_stoppable_kind():
    assert iterators.BackgroundConsumer is clean_exit.StoppableConsumer


@pytest.mark.timeout(60)
def test_stop_consumers_joins_a_thread_blocked_on_a_full_queue():
    it = iterators.BufferedIterator(2, Batches(1000))
    assert next(it)[0] == 0
    thread = it._consumer
    assert thread.is_alive()  # blocked in put(): the queue holds 2 of 999 batches
    assert clean_exit.stop_consumers(timeout=10) == 1
    assert not thread.is_alive()
    # a later iterator is unaffected
    later = iterators.BufferedIterator(2, Batches(5))
    assert [int(b[0]) for b in later] == [0, 1, 2, 3, 4]


@pytest.mark.timeout(120)
def test_process_leaving_mid_epoch_exits_zero():
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(repo=str(REPO))],
        capture_output=True,
        text=True,
        timeout=60,
        env=cli_env(),
        cwd=REPO,
    )
    assert "done" in proc.stdout
    assert "terminate called" not in proc.stderr, proc.stderr[-2000:]
    assert proc.returncode == 0, proc.stderr[-2000:]
