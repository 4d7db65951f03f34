# MIT License
# Copyright (c) the fairseq-moe plugin authors
"""Resumable steps: a step runs once, and again only when its settings change.

A step writes a marker after its outputs exist; the marker holds a signature
of the step's parameters and of all steps before it, so a rerun skips
finished steps and redoes a step (and what follows) whose settings changed.
"""

import hashlib
import json
import logging
import os
import time

from .files import read_lines, remove_path, write_lines

logger = logging.getLogger("mt_prep")


def signature(*parts):
    """Stable short hash of JSON-serialisable parts (a step's settings).

    Args:
        parts: values that determine a step's output.
    """
    blob = json.dumps(parts, sort_keys=True, default=str).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]


class Pipeline:
    """Runs named steps once, recording completion with marker files.

    Args:
        workdir: directory of the outputs; markers go to ``workdir/.done``.
        stop_after: name of the step after which ``run`` raises ``StopPipeline``.
    """

    def __init__(self, workdir, stop_after=None):
        self.workdir = workdir
        self.marker_dir = os.path.join(workdir, ".done")
        self.stop_after = stop_after
        self._chain = ""
        os.makedirs(self.marker_dir, exist_ok=True)

    def run(self, name, params, outputs, fn, fresh=None):
        """Run ``fn()`` unless step ``name`` already completed with the same settings.

        Args:
            name: step name (also the marker's file name).
            params: JSON-serialisable settings that determine the outputs.
            outputs: paths ``fn`` must create; all must exist for a skip.
            fn: callable doing the work, writing outputs atomically.
            fresh: for outputs that can change on disk after the step (downloads):
                a callable, the step is skipped only while it returns True.
        """
        sig = signature(self._chain, name, params)
        self._chain = sig
        marker = os.path.join(self.marker_dir, name)
        done = os.path.exists(marker) and read_lines(marker) == [sig]
        if done and all(os.path.exists(p) for p in outputs) and (fresh is None or fresh()):
            logger.info("step %s: already done, skipping", name)
        else:
            remove_path(marker)
            logger.info("step %s: running", name)
            start = time.time()
            fn()
            missing = [p for p in outputs if not os.path.exists(p)]
            assert not missing, f"step {name} did not produce {missing}"
            write_lines(marker, [sig])
            logger.info("step %s: done in %.1fs", name, time.time() - start)
        if self.stop_after == name:
            raise StopPipeline(name)


class StopPipeline(Exception):
    """Raised after the step requested with ``--stop-after``."""
