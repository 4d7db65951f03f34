# Copyright (c) the fairseq-moe plugin authors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""Everything this plugin changes in fairseq, DeepSpeed, torch or Python: the one list.

Where fairseq offers an extension point the plugin uses it and needs no patch: task
hooks (``build_model``, ``get_checkpoint_dict``, ``get_batch_iterator``,
``inference_step``, ``valid_step``), a model's ``load_state_dict``, a dataset wrapper,
the ``expert`` attribute fairseq's legacy DDP leaves out of its all-reduce. What remains
replaces an attribute of an upstream module, and is listed in :data:`PATCHES`. Each
entry is a function that installs one patch, with

* its reason (the docstring) and the upstream issue, where one exists;
* what it replaces, the package version and the signature it was written against: a
  guard compares them with what is installed and stops with one line if they differ
  (the patch would otherwise silently do the wrong thing);
* when it is installed: :data:`ALWAYS` when the plugin is imported (harmless for any
  fairseq run: it only adds behaviour a run of this plugin needs), :data:`TASK` when the
  ``translation_deepspeed`` task is set up, :data:`EXPERT_PARALLEL` when a model with
  ``--ep-world-size`` > 1 is set up. A fairseq run that loads the user dir but uses
  another task gets only the first kind.

Installing is idempotent: a patch whose replacement is already in place is skipped.
:data:`DEPENDENCIES` lists the private DeepSpeed functions the plugin calls without
patching them, guarded the same way.
"""

import functools
import importlib
import importlib.metadata
import inspect
import os
import sys
import types
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

from .errors import PluginError, report

ALWAYS = "always"
TASK = "translation_deepspeed task"
EXPERT_PARALLEL = "expert parallelism"

FAIRSEQ = ("fairseq-fixed", "0.12.3.1")
DEEPSPEED = ("deepspeed", "0.19.8")
PYTHON = ("python", "3")

_MARK = "_fairseq_moe_patch"  # set on every replacement: what is marked is not replaced again


class PatchError(PluginError, RuntimeError):
    """An upstream package differs from the version or signature a patch was written for."""


@dataclass(frozen=True)
class Patch:
    """One change to an upstream package (see the module docstring).

    Args:
        install: installs the patch; its docstring says why.
        scope (str): :data:`ALWAYS`, :data:`TASK` or :data:`EXPERT_PARALLEL`.
        target (str): dotted path of what is replaced (``module.attribute``).
        written_against (tuple): ``(distribution, version)`` it was written for.
        signature (str, optional): ``str(inspect.signature(target))`` when written,
            for a replaced function.
        upstream (str, optional): the upstream issue.
        calls (str, optional): an extension point the plugin relies on, which the
            replaced function must call (its source is checked).
    """

    install: Callable[[], None]
    scope: str
    target: str
    written_against: Tuple[str, str]
    signature: Optional[str] = None
    upstream: Optional[str] = None
    calls: Optional[str] = None

    @property
    def name(self) -> str:
        return self.install.__name__

    @property
    def reason(self) -> str:
        return inspect.getdoc(self.install) or ""


def patch(
    scope: str,
    target: str,
    written_against: Tuple[str, str],
    signature: Optional[str] = None,
    upstream: Optional[str] = None,
    calls: Optional[str] = None,
):
    """Declare a function as the installer of a :class:`Patch`."""

    def declare(install: Callable[[], None]) -> Patch:
        return Patch(install, scope, target, written_against, signature, upstream, calls)

    return declare


def _resolve(target: str):
    """``(owner, attribute name, current value)`` of a dotted ``module.attr[.attr]`` path."""
    parts = target.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            owner = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for name in parts[i:-1]:
            owner = getattr(owner, name)
        return owner, parts[-1], getattr(owner, parts[-1])
    raise ImportError(target)


def _installed_version(dist: str) -> Optional[str]:
    if dist == "python":
        return str(sys.version_info.major)
    try:
        return importlib.metadata.version(dist).split("+")[0]  # torch's "2.13.0+cpu"
    except importlib.metadata.PackageNotFoundError:
        return None


def check(p) -> None:
    """The guard: stop with one line if a :class:`Patch` or :class:`Dependency` no longer
    fits what is installed."""
    dist, want = p.written_against
    have = _installed_version(dist)
    fix = "install the versions setup.py pins (make install), or update user/patches.py"
    if have != want:
        raise PatchError(
            f"user/patches.py: {p.name} was written for {dist} {want} ({p.target}), but "
            f"{dist} {have or 'is not installed'}: {fix}"
        )
    try:
        _, _, current = _resolve(p.target)
    except (ImportError, AttributeError):
        raise PatchError(
            f"user/patches.py: {p.name} patches {p.target}, which {dist} {have} "
            f"does not have: {fix}"
        ) from None
    current = getattr(current, _MARK, current)  # the original behind an installed patch
    if p.signature is not None:
        found = str(inspect.signature(current))
        if found != p.signature:
            raise PatchError(
                f"user/patches.py: {p.name} was written for {p.target}{p.signature}, but "
                f"{dist} {have} has {p.target}{found}: {fix}"
            )
    calls = getattr(p, "calls", None)  # a Patch's (a Dependency has none)
    if calls is not None and f".{calls}(" not in inspect.getsource(current):
        raise PatchError(
            f"user/patches.py: the plugin needs {p.target} to call {calls}(), which "
            f"{dist} {have}'s does not: {fix}"
        )


def _replace(target: str, make: Callable[[object], object]) -> None:
    """Set ``target`` to ``make(original)``, once; the replacement remembers the original."""
    owner, name, original = _resolve(target)
    if hasattr(original, _MARK):
        return
    replacement = make(original)
    setattr(replacement, _MARK, original)
    setattr(owner, name, replacement)


def _wrap(hook: Callable) -> Callable[[object], Callable]:
    """``original -> function calling hook(original, ...)``, keeping the original's name."""

    def make(original):
        @functools.wraps(original)
        def patched(*args, **kwargs):
            return hook(original, *args, **kwargs)

        return patched

    return make


# --------------------------------------------------------------------------- always


@patch(ALWAYS, "warnings.filters", PYTHON)
def upstream_noise_silenced() -> None:
    """Silence the upstream warnings and log lines a user cannot act on (hydra's
    deprecations of fairseq's calls, torch's of fairseq's, an unused speech task's
    advice): the list, with a reason for each entry, is :data:`user.noise.NOISE`.

    First: the plugin's import is the earliest point it controls, and it imports fairseq
    and DeepSpeed (``user/train.py`` and ``user/generate.py`` import the plugin first).
    Python's warning filters and the named loggers' filters are added to, nothing replaced.
    """
    from . import noise

    noise.silence()


@patch(ALWAYS, "os.environ", PYTHON)
def deepspeed_cpu_accelerator() -> None:
    """Pick DeepSpeed's CPU accelerator when torch sees no GPU, before DeepSpeed is imported.

    DeepSpeed probes for accelerators at import and warns on a machine without one;
    users would otherwise have to set ``DS_ACCELERATOR=cpu`` themselves. A value the
    user set is kept.
    """
    if "DS_ACCELERATOR" not in os.environ:
        import torch

        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"


@patch(ALWAYS, "sys.excepthook", PYTHON)
def one_line_errors() -> None:
    """Print the plugin's own errors as one line (``fairseq-train: error: ...``).

    Under ``fairseq-train --user-dir user`` the plugin's checks run inside fairseq
    (still before any training); a bad flag or checkpoint should read like an argparse
    error, not a traceback. Other exceptions are untouched. With ``FAIRSEQ_MOE_DEBUG=1``
    the traceback is printed before the line (for a bug report).
    """
    previous = sys.excepthook

    def hook(exc_type, exc, tb):
        # (no import here: a failed guard leaves the plugin half-imported)
        if issubclass(exc_type, PluginError):
            report(os.path.basename(sys.argv[0]), exc)
            return
        previous(exc_type, exc, tb)

    if not hasattr(sys.excepthook, _MARK):
        setattr(hook, _MARK, previous)
        sys.excepthook = hook


class _Torch(types.ModuleType):
    """``torch``, for an upstream module whose ``torch.load`` is replaced."""

    def __init__(self):
        super().__init__("torch")

    def __getattr__(self, name):
        import torch

        return getattr(torch, name)


class _TorchWithSafeLoad(_Torch):
    """``torch`` whose ``load`` is the plugin's checkpoint loader
    (:func:`user.checkpoint.reading.safe_load`: weights only, plus what fairseq checkpoints hold)."""

    @staticmethod
    def load(f, map_location=None, mmap=False):
        from .checkpoint import reading

        return reading.safe_load(f, map_location=map_location, mmap=mmap)


class _TorchWithPickleLoad(_Torch):
    """``torch`` whose ``load`` unpickles everything (``weights_only=False``)."""

    @staticmethod
    def load(*args, **kwargs):
        import torch

        kwargs.setdefault("weights_only", False)
        return torch.load(*args, **kwargs)


@patch(
    ALWAYS,
    "fairseq.checkpoint_utils.torch",
    FAIRSEQ,
    upstream="https://github.com/facebookresearch/fairseq/issues/5610",
)
def fairseq_checkpoints_load_under_torch_2_6() -> None:
    """Let fairseq read its own checkpoints under torch >= 2.6, and nothing but data.

    torch 2.6 made ``torch.load`` weights-only by default; fairseq checkpoints hold an
    ``argparse.Namespace`` (and, with ``--eval-bleu``, numpy arrays), so every load
    failed; loading them with ``weights_only=False`` instead would let any checkpoint run
    code (``--path``, ``--restore-file``, ``--finetune-from-model``, the hub). fairseq's
    checkpoint module gets a ``torch`` whose ``load`` is the plugin's checkpoint loader,
    which allows exactly what fairseq checkpoints hold (:data:`user.checkpoint.reading.ALLOWED_GLOBALS`)
    and refuses any other file with one line; other ``torch.load`` calls in the process
    keep torch's default.
    """
    _replace("fairseq.checkpoint_utils.torch", lambda _: _TorchWithSafeLoad())


@patch(
    ALWAYS,
    "fairseq.distributed.utils.torch",
    FAIRSEQ,
    upstream="https://github.com/facebookresearch/fairseq/issues/5610",
)
def fairseq_broadcast_loads_under_torch_2_6() -> None:
    """Let fairseq send a loaded checkpoint from rank 0 to the other ranks under torch >= 2.6.

    ``fairseq.distributed.utils.broadcast_object`` serialises with ``torch.save`` and
    reads back with ``torch.load``: under torch's weights-only default a multi-process
    resume failed there, as a loaded checkpoint holds omegaconf objects and the plugin's
    ``ShardReader``.
    These bytes are not a user's file: rank 0 produced them in this run from a checkpoint
    it had read with the safe loader, so they are unpickled in full
    (``weights_only=False``); nothing read from disk reaches this ``load``.
    """
    _replace("fairseq.distributed.utils.torch", lambda _: _TorchWithPickleLoad())


@patch(
    ALWAYS,
    "fairseq.data.iterators.BackgroundConsumer",
    FAIRSEQ,
    signature="(queue, source, max_len, cuda_device)",
)
def prefetch_threads_stop_at_exit() -> None:
    """Stop fairseq's batch-prefetch threads before the interpreter exits.

    A run that stops mid-epoch (``--max-update``, the usual case) left the prefetch
    thread collating while Python 3.11 finalised; its forced unwind through torch's
    C++ frames aborted the process (``terminate called without an active exception``,
    exit 134) after a successful run. See :mod:`user.clean_exit`.
    """
    import atexit

    from . import clean_exit

    def make(_original):
        atexit.register(clean_exit.stop_consumers)
        return clean_exit.StoppableConsumer

    _replace("fairseq.data.iterators.BackgroundConsumer", make)


@patch(ALWAYS, "fairseq.checkpoint_utils.PathManager", FAIRSEQ)
def atomic_checkpoint_copies() -> None:
    """Copy checkpoints atomically; fsync what fairseq renames into place.

    fairseq writes a save's first file atomically, then copies it to
    ``checkpoint_last.pt`` and the other names with a plain copy: a run killed during
    the copy left a truncated ``checkpoint_last.pt`` that the next run could not load.
    Its atomic write fsyncs neither the file nor the folder before and after the
    rename: a power loss could leave an empty checkpoint or undo the save.
    """
    from .checkpoint.fairseq_hooks import AtomicCopyPathManager

    _replace("fairseq.checkpoint_utils.PathManager", AtomicCopyPathManager)


@patch(
    ALWAYS,
    "fairseq.checkpoint_utils.load_checkpoint_to_cpu",
    FAIRSEQ,
    signature="(path, arg_overrides=None, load_on_all_ranks=False)",
)
def checkpoints_load_in_any_layout() -> None:
    """Read a checkpoint of another expert-parallel layout into the running one (one
    process translating with an expert-parallel run's checkpoint, or a resume on another
    number of processes), and name a damaged file in one line (see
    :func:`user.checkpoint.fairseq_hooks.load_checkpoint_to_cpu`).

    fairseq has no hook between reading a checkpoint and loading it into the model. A
    checkpoint without expert shards is returned as fairseq read it, so any fairseq run
    may have this; ``fairseq-generate`` without ``--task`` needs it for a sharded one.
    """
    from .checkpoint import fairseq_hooks

    _replace(
        "fairseq.checkpoint_utils.load_checkpoint_to_cpu",
        _wrap(fairseq_hooks.load_checkpoint_to_cpu),
    )


# --------------------------------------------------------------------------- the task


@patch(
    TASK,
    "fairseq.checkpoint_utils.load_checkpoint",
    FAIRSEQ,
    signature="(cfg: fairseq.dataclass.configs.CheckpointConfig, trainer, **passthrough_args)",
)
def resume_restores_experts() -> None:
    """On resume: check the checkpoint against the model, restore every rank's experts
    and their optimizer state, train nothing when ``--max-update`` is reached, apply
    ``--upcycle-from`` (see :func:`user.checkpoint.fairseq_hooks.load_checkpoint`).

    fairseq loads one file on rank 0 and broadcasts it; with expert parallelism each
    rank's experts live in its own shard. Acts for the ``translation_deepspeed`` task
    only; other tasks get fairseq's function unchanged.
    """
    from .checkpoint import fairseq_hooks

    _replace("fairseq.checkpoint_utils.load_checkpoint", _wrap(fairseq_hooks.load_checkpoint))


@patch(
    TASK,
    "fairseq.logging.progress_bar.BaseProgressBar._format_stats",
    FAIRSEQ,
    signature="(self, stats)",
)
def console_prints_routing_summary() -> None:
    """The console's log lines carry the routing summary, not every layer's scalars
    (``--moe-console-metrics``, see :func:`user.expert_stats.console_stats`).

    With 6 MoE layers of 8 experts, each ``train_inner``, ``train`` and ``valid`` line
    carried about 66 numbers. fairseq has no hook between its metrics and what a bar
    prints; this method formats the stats of the console bars only (``simple``,
    ``tqdm``): ``json`` has its own, and the TensorBoard, wandb and aim wrappers log the
    stats before they hand them to the console bar.
    """
    from . import expert_stats

    def console(original, bar, stats):
        return original(bar, expert_stats.console_stats(stats))

    _replace("fairseq.logging.progress_bar.BaseProgressBar._format_stats", _wrap(console))


# --------------------------------------------------------------------------- expert parallelism


@patch(
    EXPERT_PARALLEL,
    "fairseq.checkpoint_utils.save_checkpoint",
    FAIRSEQ,
    signature="(cfg: fairseq.dataclass.configs.CheckpointConfig, trainer, epoch_itr, val_loss)",
    # the shards' record reaches the checkpoint through the task's hook (fairseq 0.12.2's
    # save_checkpoint did not call it: shards went unrecorded, a resume dropped experts)
    calls="get_checkpoint_dict",
)
def expert_shards_on_save() -> None:
    """Every expert-parallel rank writes its experts' shard next to the checkpoint.

    fairseq writes checkpoints from rank 0 only: the other ranks' experts and their
    Adam state were lost (the reference plugin's defect). See
    :func:`user.checkpoint.fairseq_hooks.save_checkpoint`.
    """
    from .checkpoint import fairseq_hooks

    _replace("fairseq.checkpoint_utils.save_checkpoint", _wrap(fairseq_hooks.save_checkpoint))


@patch(
    EXPERT_PARALLEL,
    "fairseq.utils.clip_grad_norm_",
    FAIRSEQ,
    signature="(params, max_norm, aggregate_norm_fn=None) -> torch.Tensor",
)
def gradient_norm_counts_every_expert() -> None:
    """``--clip-norm`` with expert gradients counted once, over all expert-parallel ranks.

    fairseq leaves parameters marked ``expert`` out of the norm, so with expert
    parallelism the norm missed every expert and differed from the same model on one
    process. See :func:`user.ds_moe.clip_grad_norm_`.
    """
    from . import ds_moe

    _replace(
        "fairseq.utils.clip_grad_norm_",
        lambda original: functools.partial(ds_moe.clip_grad_norm_, _fairseq=original),
    )


@patch(EXPERT_PARALLEL, "deepspeed.comm.torch.build_shm_op", DEEPSPEED, signature="()")
def no_shared_memory_op_build_on_cpu() -> None:
    """On the CPU, skip the shared-memory all-reduce op DeepSpeed compiles in
    ``init_distributed``.

    It took 25 s to minutes at every first launch and needs a C++ compiler, and serves
    only DeepSpeed's inference all-reduce; MoE uses all-to-all.
    """
    import torch

    if not torch.cuda.is_available():
        _replace("deepspeed.comm.torch.build_shm_op", lambda _original: lambda: None)


#: The list, in installation order.
PATCHES: Tuple[Patch, ...] = (
    upstream_noise_silenced,
    deepspeed_cpu_accelerator,
    one_line_errors,
    fairseq_checkpoints_load_under_torch_2_6,
    fairseq_broadcast_loads_under_torch_2_6,
    prefetch_threads_stop_at_exit,
    atomic_checkpoint_copies,
    checkpoints_load_in_any_layout,
    resume_restores_experts,
    console_prints_routing_summary,
    expert_shards_on_save,
    gradient_norm_counts_every_expert,
    no_shared_memory_op_build_on_cpu,
)


@dataclass(frozen=True)
class Dependency:
    """A private upstream function the plugin calls without patching it: guarded like a
    patch, so an upgrade that changes it stops at import instead of misrouting tokens.

    Args:
        target (str): dotted path of the function or class.
        written_against (tuple): ``(distribution, version)``.
        signature (str): ``str(inspect.signature(target))`` when written.
        used_by (str): where the plugin calls it.
    """

    target: str
    written_against: Tuple[str, str]
    signature: str
    used_by: str

    @property
    def name(self) -> str:
        return self.target


_T = "torch.Tensor"
#: Upstream internals the plugin calls or overrides without patching them: DeepSpeed's
#: routing and dispatch helpers (user/modules/gating.py, moe_ffn.py), fairseq's file copy
#: and rename.
# fmt: off
DEPENDENCIES: Tuple[Dependency, ...] = (
    Dependency("deepspeed.moe.sharded_moe.TopKGate.__init__", DEEPSPEED,
               "(self, model_dim: int, num_experts: int, k: int = 1, capacity_factor: float = "
               "1.0, eval_capacity_factor: float = 1.0, min_capacity: int = 8, noisy_gate_policy:"
               " Optional[str] = None, drop_tokens: bool = True, use_rts: bool = True, ep_group: "
               "Optional[torch.distributed.distributed_c10d.ProcessGroup] = None, "
               "top2_2nd_expert_sampling: bool = True) -> None", "gating.Gate"),
    Dependency("deepspeed.moe.sharded_moe.gumbel_rsample", DEEPSPEED,
               f"(shape: Tuple, device: torch.device) -> {_T}", "gating: top-2 sampling, RSample"),
    Dependency("deepspeed.moe.sharded_moe.multiplicative_jitter", DEEPSPEED,
               "(x, device: torch.device, epsilon=0.01)", "gating.Gate: Jitter"),
    Dependency("deepspeed.moe.sharded_moe._route_slots", DEEPSPEED,
               f"(indices: {_T}, locations: {_T}, num_experts: int, capacity: int) -> {_T}",
               "moe_ffn: buffer dispatch"),
    Dependency("deepspeed.moe.sharded_moe._sparse_encode", DEEPSPEED,
               f"(reshaped_input: {_T}, slots: {_T}, num_experts: int, capacity: int) -> {_T}",
               "moe_ffn: buffer dispatch"),
    Dependency("deepspeed.moe.sharded_moe._sparse_decode", DEEPSPEED,
               f"(expert_output: {_T}, slots: {_T}, gates: {_T}, num_tokens: int) -> {_T}",
               "moe_ffn: buffer dispatch"),
    Dependency("deepspeed.moe.sharded_moe._AllToAll.forward", DEEPSPEED,
               f"(ctx: Any, group: deepspeed.comm.comm.ProcessGroup, input: {_T}) -> {_T}",
               "moe_ffn: expert-parallel all-to-all"),
    Dependency("fairseq.file_io.PathManager.copy", FAIRSEQ,
               "(src_path: str, dst_path: str, overwrite: bool = False) -> bool",
               "checkpoint.fairseq_hooks.AtomicCopyPathManager"),
    Dependency("fairseq.file_io.PathManager.rename", FAIRSEQ, "(src: str, dst: str)",
               "checkpoint.fairseq_hooks.AtomicCopyPathManager"),
    Dependency("deepspeed.utils.groups._get_expert_parallel_group", DEEPSPEED, "(group_name)",
               "ds_moe: expert groups"),
    Dependency("deepspeed.utils.groups._get_expert_data_parallel_group", DEEPSPEED,
               "(group_name)", "ds_moe: expert gradients"),
)
# fmt: on


def install(scope: str) -> None:
    """Check and install every patch of ``scope`` (idempotent)."""
    for p in PATCHES:
        if p.scope == scope:
            check(p)
            p.install()


def check_all() -> None:
    """Run every patch's and dependency's guard (the plugin's import does, so a wrong
    version stops at once)."""
    for p in PATCHES + DEPENDENCIES:
        check(p)
