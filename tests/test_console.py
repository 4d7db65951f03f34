# MIT License
# Copyright (c) the fairseq-moe plugin authors
"""``mt_run.console``: a stage's output to its log, its progress on screen (plain lines
off a terminal, one line redrawn on one), the exit status passed on; ``mt_run.report``'s
pictures. Stand-in commands print what fairseq prints; the real runs are in
test_run_sh.py."""

import io
import json
import os
import subprocess
import sys
import textwrap

import pytest

from mt_run import console, plots, report


def fake(script):
    """A command: Python running ``script`` (dedented)."""
    return [sys.executable, "-c", textwrap.dedent(script)]


def inner(update, loss):
    rec = {"epoch": 1, "loss": f"{loss}", "ups": "4.0", "num_updates": f"{update}"}
    return f"2026-11-30 12:00:00 | INFO | train_inner | {json.dumps(rec)}"


TRAINING = [
    "2026-11-30 12:00:00 | INFO | fairseq_cli.train | {'common': {'log_interval': 1}}",
    "2026-11-30 12:00:00 | WARNING | user.losses | a weight above 1: see the docs",
    "2026-11-30 12:00:00 | WARNING | user.losses | a weight above 1: see the docs",
    *[inner(u, 10.0 - u) for u in (1, 2)],
    '2026-11-30 12:00:00 | INFO | valid | {"epoch": 1, "valid_loss": "7.5", "valid_num_updates": "2"}',
    *[inner(u, 10.0 - u) for u in (3, 4)],
]


class Screen(io.StringIO):
    def __init__(self, tty):
        super().__init__()
        self.tty = tty

    def isatty(self):
        return self.tty


def train(tmp_path, lines, tty=False, status=0, updates=4):
    script = f"""
        import sys
        for line in {lines!r}:
            print(line)
        sys.exit({status})
    """
    screen = Screen(tty)
    log = tmp_path / "run" / "train.log"
    stage = console.Train(str(log), console.Display(screen), updates)
    got = stage.run(fake(script))
    return got, screen.getvalue(), log.read_text()


def test_train_off_a_terminal_prints_plain_progress_and_logs_everything(tmp_path):
    status, shown, log = train(tmp_path, TRAINING)
    assert status == 0
    for line in TRAINING:  # the whole output in the log, under the command
        assert line in log
    assert log.startswith("==> ")
    lines = shown.splitlines()
    progress = [ln for ln in lines if ln.startswith("train ") and "updates " in ln]
    assert [ln.split()[1] for ln in progress] == ["1/4", "2/4", "3/4", "4/4"]
    assert "loss 9.000" in progress[0] and "ETA" in progress[-1]
    assert "\r" not in shown and "\033" not in shown, "no terminal codes off a terminal"
    # the actionable warning once (every rank logs it), the validation, a closing line
    assert [ln for ln in lines if "weight above 1" in ln] == [
        "train      warning: a weight above 1: see the docs"
    ]
    assert "valid      update 2: loss 7.5" in lines
    assert lines[-1].startswith("train      update 4 of 4 in ") and "valid loss 7.5" in lines[-1]
    assert "fairseq_cli.train" not in shown, "fairseq's own lines stay in the log"


def test_train_on_a_terminal_redraws_one_line(tmp_path):
    status, shown, _ = train(tmp_path, TRAINING, tty=True)
    assert status == 0
    assert shown.count("\r\033[K") >= 4, "each record redraws the progress line"
    redraws = shown.split("\r\033[K")
    assert any(r.startswith("train      [") and "3/4 updates" in r for r in redraws)
    assert redraws[-1].startswith("train      update 4 of 4"), "the closing line replaces it"
    assert "valid      update 2: loss 7.5\n" in shown


def test_a_failed_command_shows_its_last_lines_and_the_log(tmp_path):
    lines = [inner(1, 9.0), "Traceback (most recent call last):", "ValueError: no data"]
    status, shown, log = train(tmp_path, lines, status=3)
    assert status == 3
    assert "failed (exit status 3)" in shown and str(tmp_path / "run" / "train.log") in shown
    assert "  | ValueError: no data" in shown


def test_lines_in_order_reads_the_first_pipe_first_and_keeps_cut_lines_whole():
    (r_err, w_err), (r_out, w_out) = os.pipe(), os.pipe()
    with open(r_err, "rb", buffering=0) as err, open(r_out, "rb", buffering=0) as out:
        os.write(w_out, b"out 1\nout 2\n")  # written first, but both pipes have data
        os.write(w_err, b"err 1\r\nerr \xc3")  # a line cut inside a character
        lines = console.lines_in_order(err, out)
        assert [next(lines) for _ in range(3)] == [(err, "err 1"), (out, "out 1"), (out, "out 2")]
        os.write(w_err, b"\xa4 2")  # the rest, with no newline at the end
        os.close(w_err)
        os.close(w_out)
        assert list(lines) == [(err, "err \u00e4 2")]


def test_generate_writes_its_output_whole_and_counts_sentences(tmp_path):
    out = tmp_path / "gen.txt"
    script = """
        import sys
        print("INFO:fairseq.tasks.translation:/data test en-de 3 examples", file=sys.stderr)
        for i in range(3):
            print(f"S-{i}\\tsource {i}")
            print(f"D-{i}\\t-0.5\\ttarget {i}")
        print("INFO:fairseq_cli.generate:Translated 3 sentences", file=sys.stderr)
    """
    screen = Screen(False)
    stage = console.Generate(str(tmp_path / "gen.log"), console.Display(screen), str(out))
    assert stage.run(fake(script)) == 0
    assert out.read_text().count("\nD-") + out.read_text().startswith("D-") == 3
    assert "Translated 3 sentences" in (tmp_path / "gen.log").read_text()
    assert "3/3 sentences  100%" in screen.getvalue()
    assert screen.getvalue().splitlines()[-1].startswith("translate  3 sentences in ")

    # a failed run leaves the earlier output as it was, and no partial file
    before = out.read_text()
    stage = console.Generate(str(tmp_path / "gen.log"), console.Display(Screen(False)), str(out))
    assert stage.run(fake("print('S-0\\tx'); raise SystemExit(1)")) == 1
    assert out.read_text() == before and not (tmp_path / "gen.txt.tmp").exists()


def test_translate_prints_each_translation_as_it_comes(tmp_path):
    # D- (detokenized) over H-; with --nbest 2 the first, the best; H- when there is no D-
    script = """
        import sys
        print("S-0\\teins"); print("H-0\\t-0.1\\t_one"); print("D-0\\t-0.1\\tone")
        print("H-0\\t-0.9\\t_won"); print("D-0\\t-0.9\\twon")
        print("S-1\\tzwei"); print("H-1\\t-0.1\\t_two"); print("P-1\\t-0.1")
        print("S-2\\tdrei"); print("H-2\\t-0.1\\t_three"); print("D-2\\t-0.1\\tthree")
        sys.stdout.flush()
        raise SystemExit(1)  # a later line failed: what was translated stays printed
    """
    out = io.StringIO()
    screen = Screen(False)
    stage = console.Translate(str(tmp_path / "t.log"), console.Display(screen), out=out)
    assert stage.run(fake(script)) == 1
    assert out.getvalue() == "one\n_two\nthree\n"
    assert "failed (exit status 1)" in screen.getvalue()


def test_a_run_shorter_than_the_log_interval_a_finished_one_and_no_budget(tmp_path):
    # no train_inner record: the epoch's record still says where training got to
    epoch = '| train | {"epoch": 1, "train_loss": "9.1", "train_num_updates": "5"}'
    status, shown, _ = train(tmp_path, [epoch], updates=5)
    assert status == 0 and shown.splitlines()[-1].startswith("train      update 5 of 5 in ")
    # the plugin's line for a checkpoint already at the budget
    done = (
        "| INFO | user.checkpoint.fairseq_hooks | the checkpoint is at 5 updates, "
        "--max-update 5 is reached: nothing to train"
    )
    status, shown, _ = train(tmp_path, [done], updates=5)
    assert shown.splitlines()[-1] == (
        "train      nothing to train: the checkpoint has reached the budget of 5"
    )
    # --max-update 0 (an epoch budget): updates and rate, no percentage or ETA; a damaged
    # record (two processes' lines run together) is skipped
    broken = inner(1, 9.0)[:-5] + inner(2, 8.0)
    status, shown, _ = train(tmp_path, [broken, inner(3, 7.0)], updates=None)
    lines = shown.splitlines()
    assert status == 0 and lines[-2].startswith("train      3 updates") and "%" not in lines[-2]
    assert lines[-1].startswith("train      update 3 in ")


def test_progress_after_a_wait_is_shown_at_once_off_a_terminal(tmp_path):
    """The clock shown while no record has come (a tick, once a second) does not hold
    back the first progress line, even with no budget (no fraction to step by)."""
    screen = Screen(False)
    stage = console.Train(str(tmp_path / "train.log"), console.Display(screen), None)
    stage.tick()  # as the clock's thread does while the command starts
    stage.on_line(inner(3, 7.0))
    lines = screen.getvalue().splitlines()
    assert lines[0].startswith("train      running, no record yet"), lines
    assert len(lines) == 2 and lines[1].startswith("train      3 updates"), lines


def test_the_command_line_takes_the_budget_from_max_update(tmp_path):
    script = "print(" + repr(inner(2, 5.0)) + ")"
    cmd = [sys.executable, "-m", "mt_run.console", "train", "--log", str(tmp_path / "l")]
    proc = subprocess.run(
        [*cmd, "--", *fake(script), "--max-update", "8", "--max-update", "4"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "2/4 updates" in proc.stdout
    bad = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "no command" in bad.stderr


def test_pictures_from_a_json_log(tmp_path):
    records = []
    for u in range(10, 60, 10):
        rec = {"loss": 9 - u / 10, "num_updates": u}
        for layer in ("enc0", "dec0"):
            rec.update({f"moe_{layer}_e{i}": 0.25 for i in range(4)}, **{f"moe_{layer}_drop": 0.1})
        records.append(f"| train_inner | {json.dumps(rec)}")
    records.append('| valid | {"valid_loss": 5.0, "valid_bleu": 3.2, "valid_num_updates": 50}')
    drawn = report.pictures("\n".join(records), str(tmp_path), "a run")
    assert [p.rsplit("/", 1)[1] for p in drawn] == ["valid.png", "experts.png"]
    for path in drawn:
        with open(path, "rb") as f:
            head = f.read(8)
        assert head == b"\x89PNG\r\n\x1a\n"
    assert list(plots.expert_matrices(plots.log_series(
        [json.loads(r.split("| ", 2)[2]) for r in records[:-1]]
    ))) == ["enc0", "dec0"], "encoder layers first"  # fmt: skip
    # a dense run's log has no expert scalars: no expert picture
    dense = "\n".join(f'| train_inner | {{"loss": 3, "num_updates": {u}}}' for u in (1, 2))
    assert report.pictures(dense, str(tmp_path / "d"), None) == []


@pytest.mark.parametrize(
    "cmd,want",
    [(["--max-update", "7"], 7), (["--max-update=9"], 9), (["--max-update", "0"], 0), ([], None)],
)
def test_max_update(cmd, want):
    assert console.max_update(["train.py", *cmd]) == want


def test_only_the_node_that_logged_training_records_the_machine(tmp_path):
    """With NNODES > 1 every node's run.sh writes a summary into the shared run folder;
    the node whose log has no training record (rank 0 logs) leaves machine.txt alone."""
    trained, other = tmp_path / "train.node0.log", tmp_path / "train.node1.log"
    trained.write_text("\n".join(TRAINING) + "\n")
    other.write_text("2026-11-30 12:00:00 | INFO | fairseq.distributed.utils | rank 1\n")
    recorded = tmp_path / report.MACHINE_FILE
    report.main(["--log", str(trained), "--out-dir", str(tmp_path), "--record-machine"])
    first = recorded.read_text()
    recorded.write_text("the machine that trained\n")
    report.main(["--log", str(other), "--out-dir", str(tmp_path), "--record-machine"])
    assert recorded.read_text() == "the machine that trained\n"
    assert "process(es)" in first
