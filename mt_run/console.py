# MIT License
# Copyright (c) the fairseq-moe plugin authors
"""The main job as a person sees it: one line per stage, a progress bar, the full log in a file.

``run.sh`` and ``scripts/demo.sh`` start each long stage through this module. The
command's whole output goes to a log file (appended, under a line naming the command);
the screen gets what a person needs: the stage's progress, the warnings a user can act
on, validation results, one closing line, and the log's last lines if the command
fails::

    python -m mt_run.console train --log LOG --updates N -- CMD ...
    python -m mt_run.console generate --log LOG --out GEN [--sentences N] -- CMD ...
    python -m mt_run.console translate --log LOG -- CMD ...
    python -m mt_run.console step --log LOG --name NAME -- CMD ...

- ``train`` reads fairseq's records (``mt_run.fairseq_log``): updates of ``N``,
  updates/s, loss, time left; a line per validation.
- ``generate`` writes the command's stdout (``fairseq-generate``'s ``S-``/``H-``/``D-``
  lines) to ``GEN`` (renamed into place once complete) and its stderr to the log,
  counting the sentences translated.
- ``translate`` prints the translations (the ``D-`` lines, else ``H-``) of a
  ``fairseq-interactive`` run, one a line, in input order.
- ``step`` runs any other command (data preparation) with a clock.

On a terminal the progress is one line redrawn in place; elsewhere (CI, a pipe, a
file) plain lines, one per 5% of the work or per minute, in the same words::

    train  1200/2000 updates  60%  4.10 updates/s  loss 5.230  ETA 3:15

The exit status is the command's; Ctrl-C or SIGTERM is passed on to it.
"""

import argparse
import codecs
import collections
import math
import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import threading
import time

from mt_run import fairseq_log
from mt_run.processes import kill_tree

_NOTHING_LEFT = re.compile(r"is reached: nothing to train")  # user/checkpoint/fairseq_hooks.py
_EXAMPLES = re.compile(r"(\w+) \w+-\w+ (\d+) examples\s*$")  # "... test en-de 1000 examples"
# a warning or error in fairseq's log format or Python logging's default one
_LEVEL = re.compile(r"(?:\| (WARNING|ERROR) \| [^|]*\| |^(WARNING|ERROR):[^:]*:)(.*)$")
_HYP = re.compile(r"^([DH])-(\d+)\t[^\t]*\t(.*)$")

#: plain output: a progress line per this fraction of the work, or per minute
PLAIN_STEP = 0.05
PLAIN_SECONDS = 60.0


def clock(seconds):
    """``3:15``, ``1:02:03``: a duration for a person."""
    seconds = int(round(max(seconds, 0)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def lines_in_order(*pipes):
    """``(pipe, line)`` from several pipes as their lines arrive, without newlines
    (``\n``, ``\r\n`` or ``\r``, as a text pipe reads them).

    One thread reads them all; when several have data, the one listed first is read
    first, so a whole line written to it before another pipe's line is yielded before
    that one.
    """
    selector = selectors.DefaultSelector()
    decoders, rests = {}, {}
    for pipe in pipes:
        selector.register(pipe.fileno(), selectors.EVENT_READ, pipe)
        decoders[pipe] = codecs.getincrementaldecoder("utf-8")(errors="replace")
        rests[pipe] = ""
    try:
        while selector.get_map():
            ready = {key.data for key, _ in selector.select()}
            for pipe in (p for p in pipes if p in ready):
                chunk = os.read(pipe.fileno(), 1 << 16)
                text = rests[pipe] + decoders[pipe].decode(chunk, final=not chunk)
                held = "\r" if chunk and text.endswith("\r") else ""  # half of a "\r\n"?
                text = text[: len(text) - len(held)].replace("\r\n", "\n").replace("\r", "\n")
                *lines, rests[pipe] = text.split("\n")
                rests[pipe] += held
                if not chunk:  # the end: a last line without a newline is a line too
                    selector.unregister(pipe.fileno())
                    lines += [rests[pipe]] if rests[pipe] else []
                for line in lines:
                    yield pipe, line
    finally:  # (also when the reader stops early: Ctrl-C)
        selector.close()


class Display:
    """A stage's lines on one stream: redrawn in place on a terminal, plain elsewhere.

    Args:
        stream: where to write (default stdout).
        tty (bool, optional): draw in place (default: whether ``stream`` is a terminal).
    """

    def __init__(self, stream=None, tty=None):
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty() if tty is None else tty
        encoding = (getattr(self.stream, "encoding", None) or "").lower()
        self.blocks = ("\u2588", "\u2591") if "utf" in encoding else ("#", "-")
        self.shown = ""  # the progress line on screen (terminal)
        # the last plain progress line's fraction and time; the last plain clock's time
        self.plain_at = (-1.0, -math.inf)
        self.waiting_at = -math.inf
        self.lock = threading.RLock()  # the clock's thread and the readers' write here

    def _write(self, text):
        with self.lock:
            self.stream.write(text)
            self.stream.flush()

    def _clear(self):
        if self.tty and self.shown:
            self._write("\r\033[K")

    def bar(self, fraction, width=12):
        """``[█████░░░░░]``: ``fraction`` of ``width`` cells."""
        full = int(round(min(max(fraction, 0.0), 1.0) * width))
        return "[" + self.blocks[0] * full + self.blocks[1] * (width - full) + "]"

    def progress(self, label, text, fraction=None, waiting=False):
        """Show the stage's progress: ``label`` then ``text``, with a bar on a terminal.

        Plain output prints it when ``fraction`` (0 to 1, None when unknown) has moved
        by :data:`PLAIN_STEP` or :data:`PLAIN_SECONDS` have passed since the last one.
        ``waiting``: a clock while no progress has come; plain output prints it once a
        :data:`PLAIN_SECONDS`, at its own pace (the first progress line comes at once).
        """
        with self.lock:
            if self.tty:
                bar = f"{self.bar(fraction)} " if fraction is not None else ""
                line = f"{label:<10} {bar}{text}"
                columns = shutil.get_terminal_size((100, 24)).columns
                self.shown = line[: max(columns - 1, 20)]
                self._write("\r\033[K" + self.shown)
                return
            now = time.monotonic()
            if waiting:
                if now - self.waiting_at >= PLAIN_SECONDS:
                    self.waiting_at = now
                    self._write(f"{label:<10} {text}\n")
                return
            last_fraction, last_time = self.plain_at
            step = fraction is not None and fraction >= last_fraction + PLAIN_STEP
            if step or now - last_time >= PLAIN_SECONDS or fraction == 1.0 != last_fraction:
                self.plain_at = (fraction if fraction is not None else last_fraction, now)
                self._write(f"{label:<10} {text}\n")

    def line(self, label, text):
        """A line that stays (a validation, a warning), above the progress line."""
        with self.lock:
            self._clear()
            self._write(f"{label:<10} {text}\n")
            if self.tty and self.shown:
                self._write(self.shown)

    def done(self, label, text):
        """The stage's closing line, in place of its progress line."""
        with self.lock:
            self._clear()
            self.shown = ""
            self._write(f"{label:<10} {text}\n")


class Stage:
    """A command run with its output in a log file and its progress on a :class:`Display`.

    Subclasses read the output lines (:meth:`on_line`) and say how it ended
    (:meth:`closing`).
    """

    label = "step"

    def __init__(self, log, display, name=None):
        self.log_path = log
        self.display = display
        self.label = name or self.label
        self.started = time.monotonic()
        self.said = set()
        self.lines = collections.deque(maxlen=15)  # the last lines (shown on a failure)

    def elapsed(self):
        return time.monotonic() - self.started

    def on_line(self, line):
        """A line of the command's log output (no newline)."""

    def tick(self):
        """Called about once a second while the command runs."""

    def closing(self):
        """The closing line's text after a successful run."""
        return f"done in {clock(self.elapsed())}"

    def _actionable(self, line):
        # a warning or error a user may act on, once (every rank logs it)
        m = _LEVEL.search(line)
        if m:
            message = m.group(3).strip()
            if message not in self.said:
                self.said.add(message)
                self.display.line(self.label, f"{(m.group(1) or m.group(2)).lower()}: {message}")

    def _log_line(self, log, line):
        log.write(line + "\n")
        log.flush()
        self.lines.append(line)
        self._actionable(line)
        self.on_line(line)

    def popen_kwargs(self):
        """Where the command's stdout and stderr go (default: both read as the log)."""
        return {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT}

    def read(self, proc, log):
        """Read the command's output until it ends (default: stdout, the log)."""
        for raw in proc.stdout:
            self._log_line(log, raw.rstrip("\n"))

    def run(self, cmd):
        """Run ``cmd``; returns its exit status."""
        os.makedirs(os.path.dirname(os.path.abspath(self.log_path)), exist_ok=True)
        with open(self.log_path, "a", encoding="utf-8") as log:
            log.write(f"==> {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n")
            log.flush()
            try:
                proc = subprocess.Popen(
                    cmd,
                    text=True,
                    errors="replace",
                    bufsize=1,
                    # lines as they are logged, not in blocks: a pipe buffers Python's stdout
                    env={**os.environ, "PYTHONUNBUFFERED": "1"},
                    **self.popen_kwargs(),
                )
            except OSError as e:
                self.display.done(self.label, f"could not start {cmd[0]}: {e}")
                return 127
            stop = threading.Event()
            ticker = threading.Thread(target=self._ticks, args=(stop,), daemon=True)
            previous = signal.signal(signal.SIGTERM, lambda *_: proc.terminate())
            ticker.start()
            try:
                self.read(proc, log)
                status = proc.wait()
            except KeyboardInterrupt:  # the command got Ctrl-C too (same process group)
                status = self._wait_after_interrupt(proc)
            finally:
                stop.set()
                ticker.join()  # no clock after the closing line
                signal.signal(signal.SIGTERM, previous)
            self.finish(status)
        return status

    def _ticks(self, stop):
        while not stop.wait(1.0):
            self.tick()

    def _wait_after_interrupt(self, proc):
        try:
            proc.send_signal(signal.SIGINT)
            return proc.wait(timeout=30)
        except (subprocess.TimeoutExpired, KeyboardInterrupt):
            kill_tree(proc.pid)
            return proc.wait()

    def finish(self, status):
        if status == 0:
            self.display.done(self.label, self.closing())
            return
        how = "interrupted" if status in (-2, 130, -15, 143) else f"failed (exit status {status})"
        self.display.done(self.label, f"{how} after {clock(self.elapsed())}; log: {self.log_path}")
        if status not in (-2, 130, -15, 143):
            for line in self.lines:
                self.display.stream.write(f"  | {line}\n")
            self.display.stream.flush()


class Step(Stage):
    """Any command: a clock while it runs."""

    def tick(self):
        self.display.progress(self.label, f"running  {clock(self.elapsed())}", waiting=True)


class Train(Stage):
    """fairseq training: updates of ``updates``, updates/s, loss, time left, validations."""

    label = "train"

    def __init__(self, log, display, updates=None, name=None):
        super().__init__(log, display, name)
        self.total = updates  # None: no update budget (--max-update 0, an epoch budget)
        self.start = None  # (updates, time) the rate is measured from
        self.updates = None  # the last record's
        self.loss = None
        self.ups = None  # fairseq's updates/s of the last interval
        self.at = None  # when the last record came
        self.valid = None
        self.nothing_left = False

    def rate(self):
        """Updates per second since this run's first record, else fairseq's own."""
        if self.start and self.updates is not None and self.updates > self.start[0]:
            seconds = self.at - self.start[1]
            if seconds > 0:
                return (self.updates - self.start[0]) / seconds
        return self.ups

    def on_line(self, line):
        resumed = fairseq_log.resumed_updates(line)
        if resumed is not None:
            self.display.line(self.label, f"resumed at update {resumed}")
            return
        if _NOTHING_LEFT.search(line):
            self.nothing_left = True
            return
        try:
            found = fairseq_log.record(line)
        except ValueError:  # a damaged record (two processes' lines run together): skip it
            return
        if not found:
            return
        kind, rec = found
        if "num_updates" in rec:  # (valid and train records count too: a short run has no other)
            self.updates, self.at = int(rec["num_updates"]), time.monotonic()
        if kind == "train_inner" and "num_updates" in rec:
            self.loss, self.ups = rec.get("loss"), rec.get("ups")
            if self.start is None:
                self.start = (self.updates, self.at)
            self.show()
        elif kind == "valid":
            self.valid = rec
            parts = [f"{k} {rec[k]}" for k in ("loss", "bleu") if k in rec]
            at = int(rec["num_updates"]) if "num_updates" in rec else "?"
            self.display.line("valid", f"update {at}: " + ", ".join(parts))

    def show(self):
        rate, fraction = self.rate(), None
        if self.total:
            fraction = min(self.updates / self.total, 1.0)
            parts = [f"{self.updates}/{self.total} updates", f"{100 * fraction:3.0f}%"]
            if rate:
                parts.append(f"ETA {clock(max(self.total - self.updates, 0) / rate)}")
        else:
            parts = [f"{self.updates} updates"]
        if rate:
            parts.append(f"{rate:.2f} updates/s")
        if isinstance(self.loss, float):
            parts.append(f"loss {self.loss:.3f}")
        self.display.progress(self.label, "  ".join(parts), fraction)

    def tick(self):
        if self.updates is None:  # (rank 0, which logs, may be on another node)
            waited = f"running, no record yet  {clock(self.elapsed())}"
            self.display.progress(self.label, waited, waiting=True)

    def closing(self):
        if self.nothing_left:
            return f"nothing to train: the checkpoint has reached the budget of {self.total}"
        if self.updates is None:
            return f"done in {clock(self.elapsed())} (no record logged)"
        of = f" of {self.total}" if self.total else ""
        text = f"update {self.updates}{of} in {clock(self.elapsed())}"
        rate = self.rate()
        if rate:
            text += f" ({rate:.2f} updates/s)"
        if self.valid and "loss" in self.valid:
            text += f", valid loss {self.valid['loss']}"
        return text


class Generate(Stage):
    """fairseq-generate: stdout to ``out`` (complete or not at all), stderr to the log.

    Args:
        sentences (int, optional): how many to expect; default: what fairseq says it
            loaded for ``subset``.
    """

    label = "translate"

    def __init__(self, log, display, out, sentences=None, subset="test", name=None):
        super().__init__(log, display, name)
        self.out = out
        self.total = sentences
        self.subset = subset
        self.count = 0
        self.first = None  # (count, time) of the first sentence

    def popen_kwargs(self):
        return {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE}

    def read(self, proc, log):
        # one loop over both pipes, stderr first: fairseq logs how many sentences it loaded
        # before it prints the first, and the count must be known when that one is shown
        with open(self.out + ".tmp", "w", encoding="utf-8") as out:
            for pipe, line in lines_in_order(proc.stderr, proc.stdout):
                if pipe is proc.stderr:
                    m = _EXAMPLES.search(line)
                    if self.total is None and m and m.group(1) == self.subset:
                        self.total = int(m.group(2))
                    self._log_line(log, line)
                    continue
                out.write(line + "\n")
                if line.startswith("S-"):
                    self.count += 1
                    self.show()

    def finish(self, status):
        if status == 0:
            os.replace(self.out + ".tmp", self.out)
        elif os.path.exists(self.out + ".tmp"):  # no half-written output (an earlier one stays)
            os.remove(self.out + ".tmp")
        super().finish(status)

    def show(self):
        now = time.monotonic()
        if self.first is None:
            self.first = (self.count, now)  # the rate is measured from the first sentence
        text, fraction = f"{self.count} sentences", None
        if self.total:
            fraction = self.count / self.total
            text = f"{self.count}/{self.total} sentences  {100 * fraction:3.0f}%"
            done, seconds = self.count - self.first[0], now - self.first[1]
            if done > 0 and seconds > 0:
                text += f"  ETA {clock((self.total - self.count) * seconds / done)}"
        self.display.progress(self.label, text, fraction)

    def tick(self):
        if not self.count:
            waited = f"loading the model  {clock(self.elapsed())}"
            self.display.progress(self.label, waited, waiting=True)

    def closing(self):
        return f"{self.count} sentences in {clock(self.elapsed())} -> {self.out}"


class Translate(Stage):
    """fairseq-interactive: the translations on stdout, one a line, as they come (in input
    order: fairseq-interactive prints each buffer in order); the rest (its ``S-``/``H-``/
    ``P-`` lines, stderr) in the log. The ``D-`` line (detokenized) is the translation,
    else the ``H-`` line; with ``--nbest`` the first, the best."""

    label = "translate"

    def __init__(self, log, display, out=None, name=None):
        super().__init__(log, display, name)
        self.out = out or sys.stdout

    def read(self, proc, log):
        pending = None  # (id, H- text) until its D- line, or the next id, comes
        printed = set()
        for raw in proc.stdout:
            line = raw.rstrip("\n")
            self._log_line(log, line)
            m = _HYP.match(line)
            if not m:
                continue
            kind, i, text = m.group(1), int(m.group(2)), m.group(3)
            if pending and pending[0] != i and pending[0] not in printed:
                self._print(pending[1], printed, pending[0])  # no D- line for it
            if i in printed:
                continue
            if kind == "D":
                self._print(text, printed, i)
            elif pending is None or pending[0] != i:
                pending = (i, text)
        if pending and pending[0] not in printed:
            self._print(pending[1], printed, pending[0])

    def _print(self, text, printed, i):
        printed.add(i)
        self.out.write(text + "\n")
        self.out.flush()

    def finish(self, status):
        if status != 0:
            super().finish(status)


def max_update(cmd):
    """The last ``--max-update N`` (or ``--max-update=N``) of a command, or None."""
    found = None
    for i, arg in enumerate(cmd):
        if arg == "--max-update" and i + 1 < len(cmd):
            found = cmd[i + 1]
        elif arg.startswith("--max-update="):
            found = arg.split("=", 1)[1]
    return int(found) if found is not None and found.isdigit() else None


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m mt_run.console",
        description="Run a stage of the main job: its output to a log, its progress on screen.",
    )
    p.add_argument("stage", choices=["train", "generate", "translate", "step"])
    p.add_argument("--log", required=True, help="the log file (appended)")
    p.add_argument("--name", help="the label of the stage's lines")
    p.add_argument(
        "--updates", type=int, help="train: the update budget [the command's last --max-update]"
    )
    p.add_argument("--out", help="generate: the output file")
    p.add_argument("--sentences", type=int, help="generate: sentences to expect")
    p.add_argument("--subset", default="test", help="generate: the split [test]")
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--" not in argv or argv.index("--") == len(argv) - 1:
        p.error("no command: give it after --")
    cut = argv.index("--")
    args, cmd = p.parse_args(argv[:cut]), argv[cut + 1 :]
    display = Display()
    if args.stage == "train":
        # (0 or none: no update budget, e.g. --max-epoch; no percentage or ETA then)
        updates = args.updates if args.updates is not None else max_update(cmd)
        stage = Train(args.log, display, updates or None, args.name)
    elif args.stage == "generate":
        if not args.out:
            p.error("generate needs --out")
        stage = Generate(args.log, display, args.out, args.sentences, args.subset, args.name)
    elif args.stage == "translate":
        stage = Translate(args.log, Display(sys.stderr), name=args.name)
    else:
        stage = Step(args.log, display, args.name)
    status = stage.run(cmd)
    if status < 0:  # killed by a signal: the shell's convention
        status = 128 - status
    sys.exit(status)


if __name__ == "__main__":
    main()
