# Copyright (c) the fairseq-moe plugin authors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""Stop fairseq's batch-prefetch threads before the interpreter exits.

fairseq's ``BufferedIterator`` prefetches batches (``--data-buffer-size``,
default 10) in a daemon thread. A run that stops mid-epoch (``--max-update``,
the usual case) leaves that thread collating the next batch while Python
exits. Python 3.11 ends a daemon thread that wakes after finalisation began
with ``pthread_exit``; its forced unwind through torch's C++ frames calls
``std::terminate``: after a successful run the process prints ``terminate
called without an active exception`` and dies with SIGABRT (exit 134), at
random, more often on a loaded machine. Scripts and launchers that check the
exit status then report a failed run.

Here every prefetch thread stops at its next batch boundary once the process
exits: an ``atexit`` handler (it runs after the main thread is done and before
finalisation) sets their stop flags, empties the queues the threads may be blocked
on and joins them. ``user/patches.py`` makes fairseq build these threads.
"""

import queue
import threading
import time

from fairseq.data import iterators

_JOIN_SECONDS = 10.0


def _until(stop: threading.Event, source):
    """Yield ``source``'s items until ``stop`` is set."""
    for item in source:
        yield item
        if stop.is_set():
            return


class StoppableConsumer(iterators.BackgroundConsumer):
    """fairseq's ``BackgroundConsumer`` that can be ended at a batch boundary."""

    def __init__(self, queue, source, max_len, cuda_device):
        self.stop_event = threading.Event()
        super().__init__(queue, _until(self.stop_event, source), max_len, cuda_device)


def stop_consumers(timeout: float = _JOIN_SECONDS) -> int:
    """Stop and join every running prefetch thread; returns how many there were.

    Args:
        timeout (float): seconds to wait in all; a thread still busy after
            that is left as it was.
    """
    deadline = time.monotonic() + timeout
    running = [t for t in threading.enumerate() if isinstance(t, StoppableConsumer)]
    for thread in running:
        thread.stop_event.set()
    for thread in running:
        while thread.is_alive() and time.monotonic() < deadline:
            try:  # a full queue blocks the thread's put(); make room
                while True:
                    thread._queue.get_nowait()
            except queue.Empty:
                pass
            thread.join(0.05)
    return len(running)
