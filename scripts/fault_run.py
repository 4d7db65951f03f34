#!/usr/bin/env python3
# Copyright (c) the fairseq-moe plugin authors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""Kill training again and again; check that nothing is lost.

    python scripts/fault_run.py DATABIN --workdir W [--kills 10] [--nproc 2] [--max-update 30]
                                [--ep-world-size E] [--first save,shard]

Runs the same small MoE training twice: once uninterrupted, once killed with
SIGKILL at least ``--kills`` times (a random mix of: during a forward pass,
right after an update, half-way through fairseq's write of the shared checkpoint,
half-way through copying it to checkpoint_last.pt, half-way through the write of an
expert shard (EP), and from outside, on the whole process tree, 0-20 ms after a chosen
update is logged; ``--first`` names modes that strike before the mix) and restarted
each time from its checkpoint_last.pt. Several processes are expert parallel over
``--ep-world-size`` of them (all by default; fewer: expert-data-parallel replicas), and
only the first ``E`` ranks may write expert shards: the summary lists the ranks that
did. Every failed launch must have died of SIGKILL (under torchrun: a worker did), and
after every kill the checkpoint on disk must load
(shared file and shards matching); at the end the interrupted run must have logged
every update, with the uninterrupted run's losses, and end with its weights, exactly
(CPU, fp32, same seed). Prints a JSON summary; exits 1 on any difference.
"""

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from mt_run import fairseq_log, processes
from mt_run.recipes import MICRO

REPO = Path(__file__).resolve().parents[1]

# the micro model (mt_run.recipes), a checkpoint every 2 updates, the last 2 kept
# fmt: off
MODEL = [*MICRO, "--seed", "7", "--save-interval-updates", "2", "--keep-interval-updates", "2",
         "--disable-validation"]
# fmt: on


def command(databin, save, max_update, nproc, ep):
    args = [str(databin), *MODEL, "--save-dir", str(save), "--max-update", str(max_update)]
    script = str(REPO / "scripts" / "fault_inject.py")
    if nproc == 1:
        return [sys.executable, script, *args]
    # fmt: off
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_port", str(processes.free_port()), script, *args, "--ep-world-size", str(ep)]
    # fmt: on


#: the line scripts/fault_inject.py prints when a rank starts writing an expert shard
SHARD_WRITE = re.compile(r"^fault_inject: rank (\d+) writes (experts\.\S+\.pt)$", re.M)


def shard_writes(out: str) -> set:
    """``{(rank, shard file name)}`` of the expert-shard writes a launch logged."""
    return {(int(r), name) for r, name in SHARD_WRITE.findall(out)}


def env(**extra):
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    e.update({k: str(v) for k, v in extra.items()})
    return e


def checkpoint_updates(save: Path) -> int:
    """Updates of checkpoint_last.pt, after checking that it and its shards load."""
    from user.checkpoint import load_consolidated

    last = save / "checkpoint_last.pt"
    if not last.exists():
        return 0
    # raises if the file is truncated or a shard is missing or foreign
    return int(load_consolidated(str(last))["optimizer_history"][-1]["num_updates"])


def died_of_sigkill(rc: int, out: str) -> bool:
    """Whether a launch was ended by SIGKILL: its own process (``rc`` -9), or, under
    torchrun, a worker (torchrun then exits with 1 and reports each worker's exit code;
    the others got its SIGTERM, or failed when their peer vanished)."""
    if rc == -signal.SIGKILL:
        return True
    report = out.rpartition("ChildFailedError")[2]
    return rc == 1 and re.search(r"exitcode\s*:\s*-9\b", report) is not None


def temp_files(save: Path):
    """The temporary files in a save dir: what killed writes left."""
    return sorted(p.name for p in save.iterdir() if ".tmp" in p.name) if save.exists() else []


def consolidated(save: Path):
    from user.checkpoint import load_consolidated

    return load_consolidated(str(save / "checkpoint_last.pt"))


def run(cmd, timeout, kill_at_update=None, delay=0.0):
    """Run ``cmd`` (its own process group). With ``kill_at_update``, SIGKILL the
    group from outside ``delay`` seconds after it logs that update. Its output is
    also kept in ``run.logdir``."""
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env(**run.extra),
        cwd=REPO,
        start_new_session=True,
    )
    lines, reached = [], threading.Event()

    def read():
        for line in proc.stdout:
            lines.append(line)
            logged = fairseq_log.losses_by_update(line)
            if kill_at_update is not None and max(logged, default=0) >= kill_at_update:
                reached.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.time() + timeout
    try:
        while proc.poll() is None:
            if reached.wait(0.05):
                time.sleep(delay)
                processes.kill_tree(proc.pid)  # as a crashed machine would, workers included
                break
            if time.time() > deadline:
                raise RuntimeError(
                    f"timed out after {timeout}s: {' '.join(cmd)}\n{''.join(lines)[-3000:]}"
                )
    except BaseException:  # the timeout, Ctrl-C, the test's timeout: nothing left running
        processes.kill_tree(proc.pid)
        proc.wait()
        raise
    proc.wait()
    reader.join(10)
    out = "".join(lines)
    if run.logdir is not None:
        run.logdir.mkdir(parents=True, exist_ok=True)
        n = len(list(run.logdir.iterdir()))
        (run.logdir / f"{n:03d}.log").write_text(
            f"# {run.extra} kill_at_update={kill_at_update} delay={delay:.2f} rc={proc.returncode}\n{out}"
        )
    return proc.returncode, out


run.extra = {}
run.logdir = None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("databin")
    p.add_argument("--workdir", required=True)
    p.add_argument("--kills", type=int, default=10)
    p.add_argument("--nproc", type=int, default=1, help="processes (2 = expert parallel EP=2)")
    p.add_argument(
        "--ep-world-size", type=int, help="expert-parallel size with --nproc > 1 [--nproc]"
    )
    p.add_argument("--max-update", type=int, default=30)
    p.add_argument("--seed", type=int, default=1, help="seed of the fault schedule")
    p.add_argument("--timeout", type=int, default=300, help="seconds per launch")
    p.add_argument(
        "--first",
        default="",
        help="fault modes that strike first, in this order (e.g. save,shard: surely a kill "
        "in the middle of the write of the shared checkpoint and of a shard), then the mix",
    )
    args = p.parse_args(argv)
    ep = args.ep_world_size or args.nproc
    if args.nproc == 1 and ep != 1:
        p.error(f"--ep-world-size {ep} needs --nproc {ep} or more: one process holds every expert")
    if args.nproc > 1 and (ep < 2 or args.nproc % ep):
        p.error(f"--ep-world-size {ep}: use a divisor of --nproc {args.nproc} above 1")
    modes = ["forward", "between", "save", "copy", "time"] + (["shard"] if args.nproc > 1 else [])
    first = [m for m in args.first.split(",") if m]
    if set(first) - set(modes):
        p.error(f"--first {args.first}: modes with --nproc {args.nproc} are {', '.join(modes)}")
    rng = random.Random(args.seed)
    work = Path(args.workdir)
    ref, faulty = work / "uninterrupted", work / "interrupted"
    start = time.time()
    run.logdir = work / "logs"

    rc, out = run(command(args.databin, ref, args.max_update, args.nproc, ep), args.timeout)
    if rc != 0:
        raise SystemExit(f"uninterrupted run failed ({rc}):\n{out[-3000:]}")
    want = fairseq_log.losses_by_update(out)
    writes = shard_writes(out)

    kills, log, got, mismatched = 0, [], {}, []

    def record(text):
        writes.update(shard_writes(text))
        # replayed updates must repeat exactly
        for u, v in fairseq_log.losses_by_update(text).items():
            if u in got and got[u] != v:
                mismatched.append((u, got[u], v))
            got[u] = v

    while True:
        done = checkpoint_updates(faulty)
        left = args.max_update - done
        if kills >= args.kills or left < 2:
            run.extra = {"FAULT_MODE": "none"}
            rc, out = run(
                command(args.databin, faulty, args.max_update, args.nproc, ep),
                args.timeout,
            )
            if rc != 0:
                raise SystemExit(f"final run failed ({rc}):\n{out[-3000:]}")
            record(out)
            break
        mode = first[0] if first else rng.choice(modes)
        if mode == "time" and left <= 4:
            mode = "between"  # the in-process faults strike for sure; see below
        # saves happen at even updates (--save-interval-updates 2)
        target = done + rng.randint(1, min(left, 6))
        if mode in ("save", "copy", "shard"):
            target += target % 2
            target = min(target, args.max_update - (args.max_update % 2))
        if mode == "copy" and left <= 6:
            mode = "save"  # the last saves may all be end-of-epoch ones, without a copy
        # fairseq writes the shared file from rank 0; each of the first E ranks its shard
        rank = (
            0 if mode in ("save", "copy") else rng.randrange(ep if mode == "shard" else args.nproc)
        )
        if mode == "time":
            # from outside, 0-20 ms after an update is logged (an update takes
            # ~30 ms here: the next forward/backward, a save, or between); never
            # near the end, where the run could finish before the signal
            target = min(target, args.max_update - 3)
        run.extra = {
            "FAULT_MODE": mode if mode != "time" else "none",
            "FAULT_UPDATE": target,
            "FAULT_RANK": rank,
        }
        rc, out = run(
            command(args.databin, faulty, args.max_update, args.nproc, ep),
            args.timeout,
            kill_at_update=target if mode == "time" else None,
            delay=rng.uniform(0.0, 0.02),
        )
        record(out)
        if rc != 0 and not died_of_sigkill(rc, out):
            raise SystemExit(
                f"{mode} at update {target}: failed ({rc}), not killed:\n{out[-3000:]}"
            )
        if rc == 0:  # the run finished before the fault struck: start over from there
            if checkpoint_updates(faulty) < args.max_update:
                raise SystemExit(f"{mode} at update {target}: exited 0 before --max-update")
            log.append({"mode": mode, "update": target, "killed": False})
            if kills >= args.kills:
                break
            continue
        after = checkpoint_updates(faulty)  # must load: never truncated or mismatched
        if mode == "time" and after >= args.max_update:
            # the signal came after the last checkpoint: it interrupted nothing
            log.append({"mode": mode, "update": target, "killed": "after the end"})
            continue
        kills += 1
        if first and mode == first[0]:
            first.pop(0)
        # fmt: off
        log.append({"mode": mode, "update": target, "killed": True, "checkpoint_updates": after,
                    "partial": temp_files(faulty)})
        # fmt: on
        print(f"kill {kills}: {mode} at update {target}; checkpoint_last.pt at {after}", flush=True)

    final = args.max_update
    same_loss = got.get(final) is not None and got.get(final) == want.get(final)
    same_all = not mismatched and all(got[u] == want.get(u) for u in got)
    every_update = sorted(got) == list(range(1, final + 1))
    import torch

    a, b = consolidated(ref), consolidated(faulty)
    same_weights = a["model"].keys() == b["model"].keys() and all(
        torch.equal(a["model"][k], b["model"][k]) for k in a["model"]
    )
    summary = {
        "nproc": args.nproc,
        "ep_world_size": ep if args.nproc > 1 else 1,
        # the ranks that wrote expert shards, and the shard files each wrote (all launches)
        "shard_writers": sorted({r for r, _ in writes}),
        "shard_files_by_rank": {
            r: sorted({n for w, n in writes if w == r}) for r in sorted({r for r, _ in writes})
        },
        "kills": kills,
        "max_update": final,
        "final_loss": {"uninterrupted": want.get(final), "interrupted": got.get(final)},
        "same_final_loss": same_loss,
        "every_logged_update_same": same_all,
        "every_update_logged": every_update,
        "same_weights": same_weights,
        "faults": log,
        # the killed writes' temporary files, all removed by the saves that followed
        "temp_files_left": temp_files(faulty),
        "seconds": round(time.time() - start, 1),
    }
    print(json.dumps(summary, indent=1))
    if not (same_loss and same_all and every_update and same_weights and kills >= args.kills):
        sys.exit(1)


if __name__ == "__main__":
    main()
