# MIT License
# Copyright (c) the fairseq-moe plugin authors
"""The closing summary of the main job (``make demo``, ``run.sh``), and its pictures.

    python -m mt_run.report --log RUN/train.log --out-dir RUN [--stage train=481 ...]
        [--bleu "BLEU|...= 13.14 ..."] [--source test.en --reference test.de]
        [--checkpoint RUN/checkpoint_last.pt] [--translations RUN/generate-test.txt]
        [--translate 'bash run.sh translate "Select the file."'] [--device cpu]

It draws ``RUN/valid.png`` (validation loss, and BLEU when computed, against updates)
and ``RUN/experts.png`` (each MoE layer's share of tokens per expert and dropped share
over updates) from the training log (``mt_run.plots``), then prints ``name: value``
lines: BLEU with its sacreBLEU signature next to the copy-the-source baseline, the
time per stage, the checkpoint, the log, the pictures, the machine and versions the
score was measured with, and a command that translates one's own sentence.
"""

import argparse
import os
import platform
import re
import sys
from importlib import metadata

from mt_run import fairseq_log, plots
from mt_run.console import clock

#: in the run folder: the machine that trained it last (``--record-machine``)
MACHINE_FILE = "machine.txt"

#: the distributions a score depends on, as the summary names them
VERSIONS = (
    ("torch", "torch"),
    ("fairseq", "fairseq-fixed"),
    ("deepspeed", "deepspeed"),
    ("sacrebleu", "sacrebleu"),
)


def cpu_name():
    """The CPU's model name (Linux's /proc/cpuinfo, else the platform's word for it)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device="cpu", processes=1):
    """``AMD EPYC 7B13, 2 cores, 1 process x 1 thread; Python 3.11.9, torch 2.13.0, ...``:
    this machine, and the threads ``processes`` of a run on it got."""
    import torch

    if device == "cuda" and torch.cuda.is_available():
        n = torch.cuda.device_count()
        where = f"{n} x {torch.cuda.get_device_name(0)}"
    else:
        # OMP_NUM_THREADS, else torchrun's 1 per process, else torch's one per core
        threads = os.environ.get("OMP_NUM_THREADS") or (1 if processes > 1 else None)
        threads = threads or torch.get_num_threads()
        where = (
            f"{cpu_name()}, {os.cpu_count()} cores, {processes} process(es) x {threads} thread(s)"
        )
    return f"{where}; Python {platform.python_version()}, {versions()}"


def versions():
    """``torch 2.13.0+cpu, fairseq 0.12.3.1, ...``: the installed versions (package
    metadata: nothing is imported, so no package's logging set-up runs)."""
    found = []
    for name, dist in VERSIONS:
        try:
            found.append(f"{name} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            pass
    return ", ".join(found)


def score_of(line):
    """The score in a sacreBLEU line (``... = 13.14 42.3/...``), or None."""
    m = re.search(r"= ([\d.]+)", line or "")
    return m.group(1) if m else None


def copy_baseline(source, reference):
    """sacreBLEU's score of the source sentences used as the translation (``mt_prep``), or
    None when the files are not parallel."""
    import mt_prep

    src, ref = mt_prep.read_lines(source), mt_prep.read_lines(reference)
    if len(src) != len(ref):
        return None
    return mt_prep.copy_source_bleu(src, ref).score


def pictures(log_text, out_dir, title=None, records=None):
    """Draw ``valid.png`` and ``experts.png`` from a training log into ``out_dir``.

    Args:
        records: ``fairseq_log.parse(log_text)``, when the caller has it already.

    Returns:
        the paths written (a picture without data is not drawn).
    """
    records = fairseq_log.parse(log_text) if records is None else records
    train = plots.log_series(records["train_inner"])  # (both pictures draw from it)
    written = []
    valid = os.path.join(out_dir, "valid.png")
    if plots.draw_validation(
        {"valid": plots.log_series(records["valid"]), "train": train}, valid, title
    ):
        written.append(valid)
    experts = os.path.join(out_dir, "experts.png")
    if plots.draw_experts(train, experts, title):
        written.append(experts)
    return written


def summary(args):
    """The summary's ``(name, value)`` lines."""
    rows = []
    if args.bleu:
        rows.append(("BLEU", f"{score_of(args.bleu)}  ({args.bleu.strip()})"))
        copy = None
        if args.source and args.reference and os.path.isfile(args.source):
            copy = copy_baseline(args.source, args.reference)
        if copy is not None:
            rows.append(("copy source", f"{copy:.2f}  (the source sentences as output)"))
    if args.stage:
        parts = [f"{name} {clock(float(seconds))}" for name, seconds in args.stage]
        total = sum(float(s) for _, s in args.stage)
        rows.append(
            ("time", ", ".join(parts) + (f"; {clock(total)} in all" if len(parts) > 1 else ""))
        )
    if args.log and os.path.isfile(args.log):
        with open(args.log, encoding="utf-8", errors="replace") as f:
            text = f.read()
        records = fairseq_log.parse(text)  # (once: the row and the pictures read it)
        run = fairseq_log.summary(text, records)
        if run["updates"]:
            rows.append(("updates", str(run["updates"])))
        drawn = pictures(text, args.out_dir, args.title, records)
        logged = bool(run["updates"])
    else:
        drawn, logged = [], True
    folder = os.path.abspath(args.out_dir)

    def where(path):  # a name inside the run folder, else the path as given
        inside = os.path.dirname(os.path.abspath(path)) == folder
        return os.path.basename(path) if inside else path

    rows.append(("run folder", folder))
    for name, path in (("checkpoint", args.checkpoint), ("translations", args.translations)):
        if path:
            rows.append((name, where(path)))
    logs = [args.log] if args.log and os.path.isfile(args.log) else []
    logs += args.also_log or []
    if logs:
        rows.append(("logs" if len(logs) > 1 else "log", ", ".join(where(p) for p in logs)))
    if drawn:
        rows.append(("pictures", ", ".join(where(p) for p in drawn)))
    # what a score depends on: the machine (and threads) that trained, and this one
    recorded = os.path.join(folder, MACHINE_FILE)
    if args.record_machine:
        here = machine(args.device, args.processes)
        # by the node whose log has the training (every node of a multi-node run sums up
        # into the shared run folder; rank 0 logs), whole or not at all
        if logged:
            with open(recorded + ".tmp", "w", encoding="utf-8") as f:
                f.write(here + "\n")
            os.replace(recorded + ".tmp", recorded)
        rows.append(("machine", here))
    elif args.bleu:
        here = machine(args.device, args.processes)
        if os.path.isfile(recorded):
            with open(recorded, encoding="utf-8") as f:
                rows.append(("trained on", f.read().strip()))
            rows.append(("translated on", here))
        else:
            rows.append(("machine", here))
    if args.translate:
        rows.append(("translate", args.translate))
    return rows


def _stage(text):
    name, sep, seconds = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"'{text}': give NAME=SECONDS")
    float(seconds)
    return name, seconds


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m mt_run.report", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--log", help="the training log (pictures, updates)")
    p.add_argument("--also-log", action="append", help="another log to name")
    p.add_argument("--out-dir", default=".", help="where the pictures go [.]")
    p.add_argument("--title", help="the pictures' title (the run's name)")
    p.add_argument("--stage", type=_stage, action="append", help="NAME=SECONDS, in order")
    p.add_argument("--bleu", help="sacreBLEU's line for the model")
    p.add_argument("--source", help="the test source (copy baseline)")
    p.add_argument("--reference", help="the test reference (copy baseline)")
    p.add_argument("--checkpoint")
    p.add_argument("--translations")
    p.add_argument("--translate", help="a command that translates one's own sentence")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--processes", type=int, default=1, help="the run's processes [1]")
    p.add_argument(
        "--record-machine",
        action="store_true",
        help=f"training: name this machine in the summary and in OUT_DIR/{MACHINE_FILE} "
        "(there only when --log has the training's records: rank 0's node)",
    )
    args = p.parse_args(argv)
    rows = summary(args)
    width = max((len(name) for name, _ in rows), default=0) + 1
    print("summary")
    for name, value in rows:
        print(f"  {name + ':':<{width}} {value}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
