# Copyright (c) the fairseq-moe plugin authors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""``user/patches.py``: the one list of what the plugin changes upstream. Each guard
stops with one line when the installed version or signature differs; a fairseq run
that loads the user dir without the plugin's task gets only the harmless patches; the
checkpoint hooks leave other tasks' trainers alone; ``user/`` keeps no module-level
mutable state."""

import ast
import errno
import json
import os
import subprocess
import sys
from unittest import mock

import pytest

from user import patches
from user.checkpoint import fairseq_hooks

from conftest import REPO, cli_env


def test_every_guard_passes_on_the_pinned_versions():
    patches.check_all()
    assert {p.scope for p in patches.PATCHES} == {
        patches.ALWAYS,
        patches.TASK,
        patches.EXPERT_PARALLEL,
    }
    for p in patches.PATCHES:
        assert p.reason and p.target and p.written_against, p.name


def test_a_changed_signature_stops_with_one_line(monkeypatch):
    from fairseq import checkpoint_utils

    (p,) = [p for p in patches.PATCHES if p.name == "checkpoints_load_in_any_layout"]
    monkeypatch.setattr(checkpoint_utils, "load_checkpoint_to_cpu", lambda path, strict: None)
    with pytest.raises(patches.PatchError) as e:
        patches.check(p)
    msg = str(e.value)
    assert "\n" not in msg and "checkpoints_load_in_any_layout" in msg
    assert "(path, strict)" in msg and "make install" in msg


def test_another_version_stops_with_one_line(monkeypatch):
    (p,) = [p for p in patches.PATCHES if p.name == "expert_shards_on_save"]
    real = patches.importlib.metadata.version
    monkeypatch.setattr(
        patches.importlib.metadata,
        "version",
        lambda d: "0.13.0" if d == "fairseq-fixed" else real(d),
    )
    with pytest.raises(
        patches.PatchError,
        match=r"written for fairseq-fixed 0\.12\.3\.1 .* "
        r"but fairseq-fixed 0\.13\.0",
    ):
        patches.check(p)


# Run in a fresh process: which upstream functions are replaced at each stage.
PROBE = """
import json, sys
from argparse import Namespace
from fairseq import checkpoint_utils as cu, utils, tasks, options
from fairseq.data import iterators
sys.path.insert(0, {repo!r})
utils.import_user_module(Namespace(user_dir={user!r}))
from user import patches
def replaced():
    return sorted(p.name for p in patches.PATCHES
                  if hasattr(patches._resolve(p.target)[2], patches._MARK))
out = {{"import": replaced()}}
args = options.parse_args_and_arch(options.get_training_parser(), [
    {data!r}, "--task", "translation", "--arch", "transformer_tiny"])
tasks.setup_task(args)
out["translation"] = replaced()
args = options.parse_args_and_arch(options.get_training_parser(), [
    {data!r}, "--task", "translation_deepspeed", "--arch", "transformer_ds_moe_tiny"])
tasks.setup_task(args)
out["translation_deepspeed"] = replaced()
print(json.dumps(out))
"""


@pytest.mark.timeout(120)
def test_each_patch_is_installed_only_when_its_scope_is_in_use(tiny_data):
    code = PROBE.format(repo=str(REPO), user=str(REPO / "user"), data=str(tiny_data["databin"]))
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=cli_env(),
        cwd=REPO,
        timeout=110,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    always = sorted(
        p.name
        for p in patches.PATCHES
        if p.scope == patches.ALWAYS
        if p.name not in ("upstream_noise_silenced", "deepspeed_cpu_accelerator")
    )  # add filters, set a variable: nothing to mark
    task = sorted(p.name for p in patches.PATCHES if p.scope == patches.TASK)
    # a plain fairseq run with the user dir loaded: fairseq's checkpoint functions untouched
    assert got["import"] == got["translation"] == always
    assert got["translation_deepspeed"] == sorted(always + task)
    # expert-parallel patches wait for an expert-parallel model
    assert not set(got["translation_deepspeed"]) & {
        p.name for p in patches.PATCHES if p.scope == patches.EXPERT_PARALLEL
    }


def test_checkpoint_hooks_pass_other_tasks_through():
    """fairseq's own checkpoint tests drive load/save with mocked trainers of other
    tasks: the hooks must call fairseq's function and touch nothing else."""
    trainer = mock.MagicMock()
    cfg = mock.MagicMock()
    original = mock.MagicMock(return_value=("extra", "itr"))
    assert fairseq_hooks.load_checkpoint(original, cfg, trainer, a=1) == ("extra", "itr")
    original.assert_called_once_with(cfg, trainer, a=1)
    saved = mock.MagicMock(return_value="saved")
    assert fairseq_hooks.save_checkpoint(saved, cfg, trainer, "itr", 1.0) == "saved"
    saved.assert_called_once_with(cfg, trainer, "itr", 1.0)
    assert trainer.method_calls == [] and cfg.method_calls == []


MUTABLE = {
    "dict",
    "list",
    "set",
    "defaultdict",
    "OrderedDict",
    "deque",
    "WeakSet",
    "WeakKeyDictionary",
    "WeakValueDictionary",
    "Counter",
}


def module_level_state(path):
    """Module-level names bound to mutable containers, and ``global`` statements."""
    tree = ast.parse(path.read_text())
    found = []
    for node in tree.body:
        value = (
            getattr(node, "value", None) if isinstance(node, (ast.Assign, ast.AnnAssign)) else None
        )
        targets = getattr(node, "targets", [getattr(node, "target", None)])
        if all(isinstance(t, ast.Name) and t.id.startswith("__") for t in targets):
            continue  # __all__ and other module metadata
        if isinstance(
            value, (ast.Dict, ast.List, ast.Set, ast.DictComp, ast.ListComp, ast.SetComp)
        ):
            found.append(f"{path.name}:{node.lineno}")
        elif isinstance(value, ast.Call):
            fn = value.func
            name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")
            if name in MUTABLE:
                found.append(f"{path.name}:{node.lineno}")
    found += [f"{path.name}:{n.lineno} global" for n in ast.walk(tree) if isinstance(n, ast.Global)]
    return found


def test_no_module_level_mutable_state_in_the_plugin():
    found = [f for path in sorted((REPO / "user").rglob("*.py")) for f in module_level_state(path)]
    assert found == [], f"module-level mutable state: {found}"


def test_a_changed_deepspeed_internal_stops_with_one_line(monkeypatch):
    """The private DeepSpeed functions routing and dispatch call are guarded too."""
    from deepspeed.moe import sharded_moe

    monkeypatch.setattr(sharded_moe, "_sparse_encode", lambda x, slots: x)
    (dep,) = [d for d in patches.DEPENDENCIES if d.target.endswith("._sparse_encode")]
    with pytest.raises(patches.PatchError, match=r"_sparse_encode\(x, slots\)"):
        patches.check(dep)
    with pytest.raises(patches.PatchError):
        patches.check_all()


# A plugin import whose version guard fails, as fairseq-train --user-dir would see it.
WRONG_VERSION = """
import importlib.metadata as md, sys
from argparse import Namespace
real = md.version
md.version = lambda d: "0.19.9" if d == "deepspeed" else real(d)
sys.argv[0] = "fairseq-train"
from fairseq import utils
utils.import_user_module(Namespace(user_dir={user!r}))
"""


@pytest.mark.timeout(120)
def test_a_failed_guard_at_import_prints_one_line():
    proc = subprocess.run(
        [sys.executable, "-c", WRONG_VERSION.format(user=str(REPO / "user"))],
        capture_output=True, text=True, env=cli_env(), cwd=REPO, timeout=110,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    (line,) = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
    assert line.startswith("fairseq-train: error: user/patches.py: ")
    assert "deepspeed 0.19.8" in line and "0.19.9" in line


@pytest.fixture(params=["generation", "trainer"])
def loading(request):
    """The load hook outside a trainer's load (generation, hub) and inside one."""
    if request.param == "generation":
        yield
        return
    token = fairseq_hooks._LOADING_INTO.set(fairseq_hooks._TrainerLoad(None))
    yield
    fairseq_hooks._LOADING_INTO.reset(token)


def test_load_hook_names_damaged_files_and_passes_other_errors_on(tmp_path, loading):
    from fairseq import checkpoint_utils

    damaged = tmp_path / "checkpoint.pt"
    damaged.write_bytes(b"not a checkpoint")
    with pytest.raises(fairseq_hooks.fmt.ExpertCheckpointError, match="truncated or corrupt"):
        checkpoint_utils.load_checkpoint_to_cpu(str(damaged))

    def fails(path, *_):
        raise ValueError("an override fairseq rejects")

    with pytest.raises(ValueError, match="override"):  # not relabelled as a damaged file
        fairseq_hooks.load_checkpoint_to_cpu(fails, str(damaged))
    newer = {"extra_state": {"expert_shards": {"version": 99, "token": "t"}}, "model": {}}
    with pytest.raises(fairseq_hooks.fmt.ExpertCheckpointError, match="newer than this plugin"):
        fairseq_hooks.load_checkpoint_to_cpu(lambda *_: newer, str(damaged))
    plain = {"extra_state": {}, "model": {"w": 1}}
    assert fairseq_hooks.load_checkpoint_to_cpu(lambda *_: plain, str(damaged)) is plain


def test_a_fairseq_that_does_not_call_the_task_hook_stops_with_one_line(monkeypatch):
    """fairseq 0.12.2's save_checkpoint never called task.get_checkpoint_dict(): expert
    shards would go unrecorded in every checkpoint (and resume would drop experts)."""
    from fairseq import checkpoint_utils
    from fairseq.dataclass.configs import CheckpointConfig

    def save_checkpoint(cfg: CheckpointConfig, trainer, epoch_itr, val_loss):  # no hook call
        return trainer.save_checkpoint(cfg.save_dir, {})

    monkeypatch.setattr(checkpoint_utils, "save_checkpoint", save_checkpoint)
    with pytest.raises(patches.PatchError, match=r"get_checkpoint_dict.*make install"):
        patches.check_all()


def test_a_checkpoint_without_read_permission_is_named_so(tmp_path, monkeypatch, loading):
    """Not "truncated or corrupt": the file is fine, the system refused it."""
    import builtins

    import torch
    from fairseq import checkpoint_utils

    from user.checkpoint import io as ckpt_io

    path = tmp_path / "checkpoint_last.pt"
    torch.save({"model": {"w": torch.ones(1)}}, path)
    if os.geteuid() != 0:
        path.chmod(0)
    else:  # root reads anything: refuse it in the functions that open the file

        def denied(name, *args, **kwargs):
            if os.fspath(name) == str(path):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(name))
            return builtins.open(name, *args, **kwargs)

        for module in (checkpoint_utils, torch.serialization):
            monkeypatch.setattr(module, "open", denied, raising=False)
    for load in (checkpoint_utils.load_checkpoint_to_cpu, ckpt_io.read_checkpoint):
        with pytest.raises(fairseq_hooks.fmt.ExpertCheckpointError) as e:
            load(str(path))
        assert str(e.value) == f"cannot read {path}: permission denied"


def test_the_debug_variable_adds_the_traceback_to_the_one_line(monkeypatch, capsys):
    from user.errors import DEBUG

    assert hasattr(sys.excepthook, patches._MARK), "the plugin's one-line hook"
    try:
        raise fairseq_hooks.fmt.ExpertCheckpointError("x.pt: the fix")
    except fairseq_hooks.fmt.ExpertCheckpointError as e:
        error = e
    monkeypatch.delenv(DEBUG, raising=False)
    sys.excepthook(type(error), error, error.__traceback__)
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].endswith("error: x.pt: the fix")
    assert "Traceback" not in err
    monkeypatch.setenv(DEBUG, "1")
    sys.excepthook(type(error), error, error.__traceback__)
    err = capsys.readouterr().err
    assert "Traceback" in err and "test_patches.py" in err
    assert err.strip().splitlines()[-1].endswith("error: x.pt: the fix")
