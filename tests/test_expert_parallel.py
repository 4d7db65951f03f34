# Copyright (c) the fairseq-moe plugin authors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""Expert parallelism on real processes: two ranks, gloo on CPU.

Each test starts its ranks as fresh processes; each rank joins a
``torch.distributed`` gloo group on 127.0.0.1, imports the plugin as
``--user-dir`` does and builds the tiny model through fairseq's parser and the
``translation_deepspeed`` task (which, with ``--ep-world-size 2``, sets up
DeepSpeed's expert groups on that process group). The reference is the same
model in one process holding every expert (EP=1), run here in the test process.

* Training through fairseq's own ``Trainer`` (``legacy_ddp``, Adam): the global
  batch split over two ranks (EP=2 with one or two experts per rank, and EP=1
  data parallel) gives the loss, the normalised gradients of every parameter
  (router and experts included, experts matched by global index) and the weights
  after three updates of one process fed the same batch as two micro-batches.
* Uneven batches: ranks hold different numbers of sentences and tokens every
  step; each rank's output and gate loss equal the one-process ones on its
  sentences, in training and evaluation, with capacity-limited (drop) and no-drop
  routing, and one forward pass makes at most one collective besides the
  experts' all-to-alls (the shape agreement; no per-layer all-reduce or barrier).

Every run is bounded: the test process waits a fixed time for its ranks, kills
them and fails if they have not finished (a hang fails instead of blocking).
"""

import json
import multiprocessing
import os
import re
import tempfile
import time
import traceback
from argparse import Namespace
from datetime import timedelta
from multiprocessing.connection import wait
from pathlib import Path

import pytest
import torch

from mt_run import processes

from moe_helpers import KEY_BIAS, TINY, build

REPO = Path(__file__).resolve().parents[1]
USER_DIR = REPO / "user"
RANKS_TIMEOUT = 240  # seconds the test process waits for its ranks
EXPERT = re.compile(r"(\.deepspeed_experts\.)(\d+)(\.)")
GATE_WEIGHT = 0.1

# fmt: off
MOE = ["--deepspeed_moe", "enc,dec", "--moe-freq", "1", "--dropout", "0",
       "--attention-dropout", "0", "--activation-dropout", "0"]
# fmt: on
# fmt: off
TRAIN = ["--criterion", "model_and_base", "--base-criterion", "label_smoothed_cross_entropy",
         "--base-criterion-config", '{"label_smoothing": 0.1}',
         "--loss-weights", json.dumps({"base_crit": 1, "experts_gate_loss": GATE_WEIGHT}),
         "--optimizer", "adam", "--lr", "0.003", "--ddp-backend", "legacy_ddp"]
# fmt: on
# Collectives a forward pass may make besides the experts' all-to-alls.
COLLECTIVES = [
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "_all_gather_base",
    "all_gather_object",
    "broadcast",
    "broadcast_object_list",
    "barrier",
    "monitored_barrier",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "gather",
    "scatter",
    "all_reduce_coalesced",
    "send",
    "recv",
    "isend",
    "irecv",
]
ALL_TO_ALL = ["all_to_all", "all_to_all_single"]


# ---------------------------------------------------------------------------
# Running ranks


@pytest.fixture(scope="session")
def extensions_dir(tmp_path_factory):
    """One TORCH_EXTENSIONS_DIR for every rank of the session (the caller's, if set):
    anything DeepSpeed JIT-builds is then built once, not once per rank or test."""
    return os.environ.get("TORCH_EXTENSIONS_DIR") or str(tmp_path_factory.mktemp("torch_ext"))


def _import_plugin():
    from fairseq import utils

    utils.import_user_module(Namespace(user_dir=str(USER_DIR)))


def _rank_main(rank, world, port, job, kwargs, out):
    """Entry point of one rank (a spawned process)."""
    try:
        torch.set_num_threads(1)
        torch.distributed.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=RANKS_TIMEOUT),
        )
        _import_plugin()
        result = JOBS[job](rank, world, **kwargs)
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))
        torch.distributed.barrier()  # no rank tears the group down under another
        torch.distributed.destroy_process_group()
    except BaseException:
        Path(out, f"rank{rank}.err").write_text(traceback.format_exc())
        raise SystemExit(1) from None


def run_ranks(job, world, extensions_dir, timeout=RANKS_TIMEOUT, **kwargs):
    """Run ``JOBS[job](rank, world, **kwargs)`` on ``world`` fresh processes.

    Returns the per-rank results. Fails (after killing every rank) if a rank
    raises, exits with an error, or the ranks are not done within ``timeout``.
    """
    ctx = multiprocessing.get_context("spawn")
    env = {"TORCH_EXTENSIONS_DIR": extensions_dir, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    saved = {k: os.environ.get(k) for k in env}
    with tempfile.TemporaryDirectory() as out:
        os.environ.update(env)  # spawned children inherit the environment at start
        try:
            port = processes.free_port()
            procs = [
                ctx.Process(target=_rank_main, args=(r, world, port, job, kwargs, out), daemon=True)
                for r in range(world)
            ]
            for p in procs:
                p.start()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        deadline = time.monotonic() + timeout
        try:
            while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
                wait([p.sentinel for p in procs if p.is_alive()], timeout=1.0)
                if any(p.exitcode not in (None, 0) for p in procs):
                    break  # one rank failed: the others would wait for it until the timeout
            hung = [r for r, p in enumerate(procs) if p.is_alive()]
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
                p.join(10)
        errors = "".join(
            f"\n--- rank {r} ---\n{Path(out, f'rank{r}.err').read_text()}"
            for r in range(world)
            if Path(out, f"rank{r}.err").exists()
        )
        if errors or (any(p.exitcode != 0 for p in procs) and not hung):
            pytest.fail(f"{job}: ranks failed (exit codes {[p.exitcode for p in procs]}):{errors}")
        if hung:
            pytest.fail(f"{job}: ranks {hung} still running after {timeout} s (hang), killed")
        return [torch.load(Path(out, f"rank{r}.pt"), weights_only=False) for r in range(world)]


# ---------------------------------------------------------------------------
# Jobs: run on every rank, and in the test process (rank 0 of 1) for the reference


def _data(databin):
    return {"databin": Path(databin)}


def _collate(task, indices):
    ds = task.dataset("valid")
    return ds.collater([ds[i] for i in indices])


def _global_name(name, ep_rank, local_experts):
    """Parameter name with the local expert index replaced by the global one."""
    return EXPERT.sub(
        lambda m: f"{m.group(1)}{int(m.group(2)) + ep_rank * local_experts}{m.group(3)}", name
    )


def _named_global(model):
    """``(name, parameter)`` pairs, expert names by global expert index."""
    from user import ds_moe

    opts = model.moe_opts
    ep_rank = ds_moe.expert_parallel_rank(opts.ep_size)
    local = opts.num_experts // opts.ep_size
    return [(_global_name(n, ep_rank, local), p) for n, p in model.named_parameters()]


def _weights(model):
    """Parameters by global name, and the gates' balancing biases (buffers, replicated)."""
    weights = {n: p.detach().clone() for n, p in _named_global(model)}
    weights.update(
        (n, b.detach().clone()) for n, b in model.named_buffers() if n.endswith(".expert_bias")
    )
    return weights


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in _named_global(model) if p.grad is not None}


def train_job(rank, world, databin, flags, steps):
    """Train with fairseq's Trainer; ``steps[i][r]`` are rank r's sentences in update i.

    In one process (``world == 1``) every rank's sentences are one micro-batch each
    of the same update, which is the same global batch.
    """
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq.trainer import Trainer

    task, model = build(_data(databin), "transformer_ds_moe", *flags, seed=1)
    args = model.args
    criterion = task.build_criterion(args)
    trainer = Trainer(convert_namespace_to_omegaconf(args), task, model, criterion)

    logs = []
    train_step = task.train_step

    def recording_train_step(*a, **kw):
        loss, sample_size, log = train_step(*a, **kw)
        logs.append(
            {k: float(v) for k, v in log.items() if k.startswith("loss") or k == "sample_size"}
        )
        return loss, sample_size, log

    task.train_step = recording_train_step
    task.load_dataset("valid")
    initial = _weights(model)
    losses, grads = [], []
    for per_rank in steps:
        del logs[:]
        mine = per_rank[rank::world]
        trainer.train_step([_collate(task, idx) for idx in mine])
        losses.append({k: sum(log[k] for log in logs) for k in logs[0]})
        grads.append(_grads(model))
    final = _weights(model)
    return {
        "initial": initial,
        "losses": losses,
        "grads": grads,
        "final": final,
        "expert_flags": sorted(n for n, p in _named_global(model) if hasattr(p, "expert")),
    }


class CollectiveCounter:
    """Counts calls of ``torch.distributed`` collectives (DeepSpeed's and the plugin's)."""

    def __init__(self):
        self.counts = {}
        self.bytes = {}
        self._saved = {}

    def __enter__(self):
        import torch.distributed as dist

        for name in COLLECTIVES + ALL_TO_ALL:
            fn = getattr(dist, name, None)
            if fn is None:
                continue
            self._saved[name] = fn

            def counted(*a, _fn=fn, _name=name, **kw):
                self.counts[_name] = self.counts.get(_name, 0) + 1
                # what this rank sends: all_to_all_single(output, input), else the first tensor
                sent = a[1] if _name == "all_to_all_single" and len(a) > 1 else kw.get("input")
                if sent is None:
                    sent = next((t for t in a if isinstance(t, torch.Tensor)), None)
                if isinstance(sent, torch.Tensor):
                    size = sent.numel() * sent.element_size()
                    self.bytes[_name] = self.bytes.get(_name, 0) + size
                return _fn(*a, **kw)

            setattr(dist, name, counted)
        return self

    def __exit__(self, *exc):
        import torch.distributed as dist

        for name, fn in self._saved.items():
            setattr(dist, name, fn)

    def reset(self):
        self.counts = {}
        self.bytes = {}

    def others(self):
        return {k: v for k, v in self.counts.items() if k not in ALL_TO_ALL}

    def all_to_all(self):
        return sum(v for k, v in self.counts.items() if k in ALL_TO_ALL)


def forward_job(rank, world, databin, flags, steps, exact_fit=None, fast_dispatch=None):
    """Forward (train and eval mode) and backward on rank r's sentences ``steps[i][r]``.

    In one process (``world == 1``) every rank's sentences are run one after the other.
    Returns the outputs, the gate losses and the collectives each forward made.
    ``exact_fit``, ``fast_dispatch``: set on every MoE layer (None: the default; exact
    fit True: for every size).
    """
    task, model = build(_data(databin), "transformer_ds_moe", *flags, seed=1)
    for m in model.moe_ffn_layers().values():
        m.exact_fit = exact_fit
        m.fast_dispatch = fast_dispatch
        if exact_fit:
            m.exact_fit_min_tokens = 0  # these batches are small
    task.load_dataset("valid")
    n_moe = len(model.moe_ffn_layers())
    results = []
    with CollectiveCounter() as counter:
        for per_rank in steps:
            for idx in per_rank[rank::world]:
                net_input = _collate(task, idx)["net_input"]
                step = {}
                for mode in ("train", "eval"):
                    model.train(mode == "train")
                    counter.reset()
                    with torch.set_grad_enabled(mode == "train"):
                        x, extra = model(**net_input)
                    step[mode] = {
                        "out": x.detach().clone(),
                        "gate_loss": extra["experts_gate_loss"].detach().clone(),
                        "others": counter.others(),
                        "all_to_all": counter.all_to_all(),
                        "n_moe": n_moe,
                    }
                    if mode == "train":
                        (x.float().pow(2).mean() + extra["experts_gate_loss"]).backward()
                        model.zero_grad()
                results.append(step)
    return results


def comm_job(rank, world, databin, flags, sentences):
    """One training forward and backward of ``sentences`` (the same on every rank): the
    collectives it made (calls and bytes sent, by name), and each MoE layer's tokens."""
    task, model = build(_data(databin), "transformer_ds_moe", *flags, seed=1)
    task.load_dataset("valid")
    net_input = _collate(task, sentences)["net_input"]
    model.train()
    with CollectiveCounter() as counter:
        x, extra = model(**net_input)
        (x.float().pow(2).mean() + extra["experts_gate_loss"]).backward()
    src, prev = net_input["src_tokens"], net_input["prev_output_tokens"]
    return {
        "counts": dict(counter.counts),
        "bytes": dict(counter.bytes),
        "tokens": [
            src.numel() if n.startswith("encoder") else prev.numel() for n in model.moe_ffn_layers()
        ],
    }


def paths_job(rank, world, databin, flags, steps):
    """Each step on the buffer path, then through the exchange (``fast_dispatch``),
    in training (forward and backward) and evaluation: outputs, gate losses, gradients
    and the collectives of each forward, per path."""
    from user.modules.moe_ffn import MoEFeedForward

    task, model = build(_data(databin), "transformer_ds_moe", *flags, seed=1)
    task.load_dataset("valid")
    layers = list(model.moe_ffn_layers().values())
    results = []
    # which path each layer took: the buffer path's forwards are counted
    buffer_forwards = [0]
    forward_buffers = MoEFeedForward._forward_buffers

    def counted(self, *a, **kw):
        buffer_forwards[0] += 1
        return forward_buffers(self, *a, **kw)

    MoEFeedForward._forward_buffers = counted  # (this rank's own process)
    with CollectiveCounter() as counter:
        for per_rank in steps:
            for idx in per_rank[rank::world]:
                net_input = _collate(task, idx)["net_input"]
                step = {}
                for path, fast in (("buffers", False), ("exchange", True)):
                    for m in layers:
                        m.fast_dispatch = fast
                    for mode in ("train", "eval"):
                        model.train(mode == "train")
                        counter.reset()
                        buffer_forwards[0] = 0
                        torch.manual_seed(len(results))  # the same gate samples on both paths
                        with torch.set_grad_enabled(mode == "train"):
                            x, extra = model(**net_input)
                        got = {
                            "out": x.detach().clone(),
                            "gate_loss": extra["experts_gate_loss"].detach().clone(),
                            "others": counter.others(),
                            "all_to_all": counter.all_to_all(),
                            "buffer_forwards": buffer_forwards[0],
                        }
                        if mode == "train":
                            (x.float().pow(2).mean() + extra["experts_gate_loss"]).backward()
                            got["grads"] = _grads(model)
                            model.zero_grad()
                        step[path, mode] = got
                results.append(step)
    return {"steps": results, "n_moe": len(layers)}


JOBS = {"train": train_job, "forward": forward_job, "comm": comm_job, "paths": paths_job}


# ---------------------------------------------------------------------------
# Comparisons


def _merge_ranks(dicts):
    """One dict by global name from the ranks' dicts; replicas must agree exactly."""
    merged = {}
    for d in dicts:
        for k, v in d.items():
            if k in merged:
                torch.testing.assert_close(
                    v, merged[k], rtol=0, atol=0, msg=f"replicas differ: {k}"
                )
            else:
                merged[k] = v
    return merged


def _assert_same_params(got, want, what, rtol, atol):
    assert sorted(got) == sorted(want), f"{what}: parameter names differ"
    bad = []
    for k in want:
        try:
            torch.testing.assert_close(got[k], want[k], rtol=rtol, atol=atol)
        except AssertionError as e:
            bad.append(f"{k}: {str(e).splitlines()[-3:]}")
    assert not bad, f"{what} differ from one process (EP=1):\n" + "\n".join(bad)


def _one_process(flags):
    """The same flags for one process holding every expert (EP=1)."""
    flags = list(flags)
    flags[flags.index("--ep-world-size") + 1] = "1"
    return flags


def _length_sorted(task, n):
    """Indices of valid sentences, longest source first (ties broken by index)."""
    task.load_dataset("valid")
    sizes = task.dataset("valid").src_sizes
    return sorted(range(len(sizes)), key=lambda i: (-int(sizes[i]), i))[:n]


def _uneven_steps(task, world=2):
    """Per update, each rank's sentences: different sentence and token counts, the
    bigger share moving between the ranks."""
    s = _length_sorted(task, 40)
    if world == 2:
        return [
            [[s[0], s[1], s[2]], [s[39]]],  # 3 long sentences vs 1 short one
            [[s[38], s[30]], [s[3], s[4], s[5], s[6]]],
            [[s[10], s[20], s[25]], [s[7], s[35]]],
        ]
    # rank r takes 1 + (r + u) % 3 sentences in update u, long and short ones in turn
    steps, i = [], 0
    for u in range(3):
        update = []
        for r in range(world):
            n = 1 + (r + u) % 3
            update.append([s[(i + j * 13) % len(s)] for j in range(n)])
            i += 7
        steps.append(update)
    return steps


# ---------------------------------------------------------------------------
# Tests

# fmt: off
CONFIGS = {
    # W=2 ranks, E=2: one expert per rank, tokens over capacity dropped (none here)
    "ep2_drop_1_local": ["--num-experts", "2", "--ep-world-size", "2"],
    # W=2, E=2: two experts per rank, no token dropped: the exchange
    "ep2_no_drop_2_local": ["--num-experts", "4", "--ep-world-size", "2", "--no-moe-drop-tokens"],
    # W=2, E=2, gradients clipped: the global norm counts every expert once
    "ep2_clip_norm": ["--num-experts", "4", "--ep-world-size", "2", "--clip-norm", "0.05"],
    # W=2, E=1: experts replicated, ordinary data parallel
    "dp2_ep1": ["--num-experts", "2", "--ep-world-size", "1"],
    # W=2, E=2, activation checkpointing: the backward's recompute of each MoE layer
    # must route and exchange tokens as its forward did, on every rank
    "ep2_checkpoint_activations": ["--num-experts", "4", "--ep-world-size", "2",
                                   "--checkpoint-activations"],
    "ep2_no_drop_checkpoint_activations": ["--num-experts", "4", "--ep-world-size", "2",
                                           "--no-moe-drop-tokens", "--checkpoint-activations"],
    # W=2, E=2, the router z-loss on (weighted 0.01 so that its gradient shows). Expert
    # output masking and expert dropout stay off: their random numbers are drawn per
    # process (masking) or per expert batch (dropout), so a split batch cannot match
    "ep2_z_loss": ["--num-experts", "4", "--ep-world-size", "2", "--moe-z-loss",
                   "--loss-weights", json.dumps({"base_crit": 1, "experts_gate_loss": GATE_WEIGHT,
                                                 "experts_z_loss": 0.01})],
    # W=2, E=2, balancing bias: every rank's bias moves by the load of all ranks' tokens,
    # as one process's does by its micro-batches' (a rate large enough to change routes)
    "ep2_bias_balance": ["--num-experts", "4", "--ep-world-size", "2",
                         "--moe-bias-balance", "0.05"],
}
# More ranks than 2: (processes W, flags).
SCALE_CONFIGS = {
    # W=4, E=2: two expert-data-parallel replicas of each expert, clipped gradients, no
    # token dropped (the exchange)
    "w4_ep2": (4, ["--num-experts", "4", "--ep-world-size", "2", "--clip-norm", "0.05",
                   "--no-moe-drop-tokens"]),
    # W=4, E=4, two experts per rank
    "w4_ep4": (4, ["--num-experts", "8", "--ep-world-size", "4"]),
    # W=8, E=8: the reference's shape (--ep-world-size 8 on 8 GPUs), one expert per rank
    "w8_ep8": (8, ["--num-experts", "8", "--ep-world-size", "8"]),
}
# fmt: on


def no_drop_capacity(flags):
    """Capacity for every token (factor = experts, top-1): nothing is dropped, so the
    split cannot change routing."""
    experts = flags[flags.index("--num-experts") + 1]
    return ["--moe-capacity-factor", experts, "--moe-eval-capacity-factor", experts]


@pytest.mark.timeout(RANKS_TIMEOUT + 120)
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_trainer_on_two_ranks_matches_one_process(tiny_data, extensions_dir, config):
    """Loss, gradients (router and experts included) and weights after three
    updates of fairseq's Trainer on two ranks equal those of one process."""
    _check_trainer_matches_one_process(tiny_data, extensions_dir, CONFIGS[config], 2)


@pytest.mark.scale
@pytest.mark.timeout(2 * RANKS_TIMEOUT + 120)
@pytest.mark.parametrize("config", sorted(SCALE_CONFIGS))
def test_trainer_on_four_and_eight_ranks_matches_one_process(tiny_data, extensions_dir, config):
    """The same at W = 4 and 8: expert-data-parallel replicas (E < W) average their
    experts' gradients over W / E ranks, several experts per rank, the reference's
    W = E = 8; uneven batches on every rank, clipping counts each expert once."""
    world, flags = SCALE_CONFIGS[config]
    _check_trainer_matches_one_process(tiny_data, extensions_dir, flags, world)


def _check_trainer_matches_one_process(tiny_data, extensions_dir, config_flags, world):
    """Train 3 updates on ``world`` ranks and in one process (every rank's batch a
    micro-batch of the same update, as --update-freq W) and compare them."""
    flags = [*MOE, *TRAIN, *config_flags, *no_drop_capacity(config_flags)]
    task, _ = build(tiny_data, "transformer_ds_moe", *_one_process(flags))
    steps = _uneven_steps(task, world)
    databin = str(tiny_data["databin"])

    want = train_job(0, 1, databin, _one_process(flags), steps)
    got = run_ranks(
        "train",
        world,
        extensions_dir,
        timeout=RANKS_TIMEOUT * world // 2,
        databin=databin,
        steps=steps,
        flags=[*flags, "--distributed-world-size", str(world)],
    )

    expert_parallel = _one_process(flags) != flags
    for g in got:
        if expert_parallel:
            # experts are rank-local: legacy_ddp skips them, the task reduces them
            assert g["expert_flags"] and all(".deepspeed_experts." in n for n in g["expert_flags"])
        else:
            assert g["expert_flags"] == []
    # same model, whatever the split: EP ranks hold the global experts r*L .. r*L+L-1
    _assert_same_params(
        _merge_ranks([g["initial"] for g in got]),
        want["initial"],
        "initial weights",
        rtol=0,
        atol=0,
    )
    for i in range(len(steps)):
        loss = {k: sum(g["losses"][i][k] for g in got) for k in want["losses"][i]}
        assert loss["sample_size"] == want["losses"][i]["sample_size"]
        for k, v in want["losses"][i].items():
            assert loss[k] == pytest.approx(v, rel=1e-5), f"update {i}: {k}"
        assert want["losses"][i]["loss_experts_gate_loss"] > 0
        assert want["losses"][i].get("loss_experts_z_loss", 1) > 0
        assert ("loss_experts_z_loss" in loss) == ("--moe-z-loss" in flags)
        _assert_same_params(
            _merge_ranks([g["grads"][i] for g in got]),
            want["grads"][i],
            f"gradients of update {i}",
            rtol=1e-4,
            atol=1e-7,
        )
    # Attention key biases get no gradient in exact arithmetic (softmax ignores a
    # shift shared by all keys), only rounding noise, which Adam scales up to
    # full-size steps; every other weight must agree.
    assert all(g.abs().max() < 1e-6 for k, g in want["grads"][0].items() if KEY_BIAS.search(k))
    final = {k: v for k, v in want["final"].items() if not KEY_BIAS.search(k)}
    _assert_same_params(
        {
            k: v
            for k, v in _merge_ranks([g["final"] for g in got]).items()
            if not KEY_BIAS.search(k)
        },
        final,
        f"weights after {len(steps)} updates",
        rtol=1e-4,
        atol=1e-6,
    )
    # and training moved them
    moved = [k for k in want["final"] if not torch.equal(want["final"][k], want["initial"][k])]
    assert any(".deepspeed_experts." in k for k in moved) and any(".gate.wg." in k for k in moved)
    biases = [k for k in want["final"] if k.endswith(".expert_bias")]
    assert bool(biases) == ("--moe-bias-balance" in flags)
    assert all(k in moved for k in biases), "the balancing biases moved"


@pytest.mark.timeout(RANKS_TIMEOUT + 120)
@pytest.mark.parametrize("drop", ["drop", "no_drop", "no_drop_buffers", "no_drop_buffers_no_fit"])
def test_uneven_batches_match_one_process_with_one_collective(tiny_data, extensions_dir, drop):
    """Ranks with different sentence and token counts every step: no hang, each
    rank's output and gate loss equal one process's on the same sentences, and a
    forward pass makes one collective besides the all-to-alls. Per MoE layer: with
    dropping, DeepSpeed's 2 all-to-alls of padded buffers; without, the exchange's 3
    (the counts, then the routes and back; 2 in evaluation, which sends the counts with
    the routes), or on the buffer path 2 and one all-reduce to fit the buffers to the
    busiest expert (unless that is turned off)."""
    flags = [*MOE, "--num-experts", "4", "--ep-world-size", "2"]
    flags += no_drop_capacity(flags)
    if drop == "drop":  # DeepSpeed's capacity-limited routing, in evaluation too
        flags.append("--moe-eval-drop-tokens")
    else:  # no token dropped (evaluation's default)
        flags.append("--no-moe-drop-tokens")
    exact_fit = {"no_drop_buffers": True, "no_drop_buffers_no_fit": False}.get(drop)
    fast_dispatch = False if drop.startswith("no_drop_buffers") else None
    task, _ = build(tiny_data, "transformer_ds_moe", *_one_process(flags))
    steps = _uneven_steps(task)
    databin = str(tiny_data["databin"])

    # one process runs, per update, rank 0's sentences, then rank 1's
    want = forward_job(0, 1, databin, _one_process(flags), steps)
    got = run_ranks(
        "forward",
        2,
        extensions_dir,
        databin=databin,
        flags=flags,
        steps=steps,
        exact_fit=exact_fit,
        fast_dispatch=fast_dispatch,
    )

    problems = []
    for i in range(len(steps)):
        for r in range(2):
            ref, res = want[2 * i + r], got[r][i]
            for mode in ("train", "eval"):
                where = f"update {i}, rank {r} ({len(steps[i][r])} sentences), {mode}"
                for key, tol in (("out", 1e-5), ("gate_loss", 1e-6)):
                    try:
                        torch.testing.assert_close(
                            res[mode][key], ref[mode][key], rtol=1e-5, atol=tol
                        )
                    except AssertionError as e:
                        problems.append(f"{where}: {key} differs: {str(e).splitlines()[-2:]}")
                # the exchange: counts, rows, outputs; without autograd counts and rows in one
                per_layer = {"train": 3, "eval": 2}[mode] if drop == "no_drop" else 2
                if res[mode]["all_to_all"] != per_layer * res[mode]["n_moe"]:
                    problems.append(f"{where}: {res[mode]['all_to_all']} all-to-alls")
                fit = res[mode]["n_moe"] if drop == "no_drop_buffers" else 0
                if sum(res[mode]["others"].values()) != 1 + fit:
                    problems.append(
                        f"{where}: collectives besides all-to-all: "
                        f"{res[mode]['others']} (expected 1 + {fit})"
                    )
    assert not problems, "\n".join(problems)


@pytest.mark.timeout(RANKS_TIMEOUT + 120)
def test_exchange_equals_the_buffer_path(tiny_data, extensions_dir):
    """Without dropping, the exchange (variable-size all-to-alls of exactly the routes)
    gives the buffer path's outputs, gate losses and gradients (router and experts) on
    uneven batches, top-2 with two experts per rank, in training and evaluation; and it
    is the path taken: per MoE layer 3 all-to-alls in training, 2 in evaluation (the
    counts sent with the routes) and no all-reduce, where the buffer path makes 2
    all-to-alls."""
    flags = [*MOE, *TRAIN, "--num-experts", "4", "--ep-world-size", "2", "--top-k", "2"]
    flags += ["--no-moe-drop-tokens"]
    task, _ = build(tiny_data, "transformer_ds_moe", *_one_process(flags))
    steps = _uneven_steps(task)
    got = run_ranks(
        "paths", 2, extensions_dir, databin=str(tiny_data["databin"]), flags=flags, steps=steps
    )
    for r, res in enumerate(got):
        n_moe = res["n_moe"]
        for i, step in enumerate(res["steps"]):
            for mode in ("train", "eval"):
                where = f"rank {r}, batch {i}, {mode}"
                want, have = step["buffers", mode], step["exchange", mode]
                for key in ("out", "gate_loss"):
                    torch.testing.assert_close(
                        have[key], want[key], rtol=1e-5, atol=1e-6, msg=where
                    )
                # each path is the one taken: every layer on the buffers, or none
                assert (want["buffer_forwards"], have["buffer_forwards"]) == (n_moe, 0), where
                assert have["all_to_all"] == {"train": 3, "eval": 2}[mode] * n_moe, where
                assert have["others"] == {"all_reduce": 1}, (where, have["others"])
                # exact fit applies from 1024 tokens; these are fewer
                assert want["all_to_all"] == 2 * n_moe, where
            _assert_same_params(
                step["exchange", "train"]["grads"],
                step["buffers", "train"]["grads"],
                f"rank {r}, batch {i}: gradients",
                rtol=1e-4,
                atol=1e-6,
            )


@pytest.mark.timeout(300)
def test_activation_checkpointing_changes_nothing_in_one_process(tiny_data):
    """--checkpoint-activations recomputes each layer in the backward: the losses, every
    gradient (the routers' gate-loss part included) and the weights after three updates
    are exactly those of the run that keeps its activations."""
    flags = [*MOE, *TRAIN, "--num-experts", "4", "--ep-world-size", "1"]
    task, _ = build(tiny_data, "transformer_ds_moe", *flags)
    steps = _uneven_steps(task)
    databin = str(tiny_data["databin"])
    want = train_job(0, 1, databin, flags, steps)
    got = train_job(0, 1, databin, [*flags, "--checkpoint-activations"], steps)
    assert got["losses"] == want["losses"]
    for i in range(len(steps)):
        _assert_same_params(got["grads"][i], want["grads"][i], f"gradients {i}", rtol=0, atol=0)
    _assert_same_params(got["final"], want["final"], "weights", rtol=0, atol=0)


@pytest.mark.scale
@pytest.mark.timeout(3 * RANKS_TIMEOUT)
def test_communication_per_moe_layer_does_not_grow_with_world(tiny_data, extensions_dir):
    """One training update (forward and backward) at W = 2, 4, 8 with E = W, each rank
    holding the same batch: per MoE layer 2 all-to-alls forward and 2 backward, each
    sending the dispatch buffer (experts x capacity x model dim, the theoretical volume);
    besides them one all-reduce per forward, for the whole model (the agreed token
    counts): no per-layer barrier or all-reduce. Neither grows with W."""
    from user.modules.gating import expert_capacity

    dim = int(TINY[TINY.index("--encoder-embed-dim") + 1])
    table, rows = [], {}
    for world in (2, 4, 8):
        flags = [*MOE, *TRAIN, "--num-experts", str(world), "--ep-world-size", str(world),
                 "--distributed-world-size", str(world)]  # fmt: skip
        got = run_ranks("comm", world, extensions_dir, timeout=RANKS_TIMEOUT * world // 2,
                        databin=str(tiny_data["databin"]), flags=flags,
                        sentences=list(range(6)))  # fmt: skip
        for r, g in enumerate(got):
            n_moe = len(g["tokens"])
            # 4 byte floats; capacity as DeepSpeed computes it (factor 1, top-1, min 4)
            per_a2a = [world * expert_capacity(s, world, 1.0, 1, 4) * dim * 4 for s in g["tokens"]]
            theory = 4 * sum(per_a2a)
            a2a_calls = sum(g["counts"].get(k, 0) for k in ALL_TO_ALL)
            a2a_bytes = sum(g["bytes"].get(k, 0) for k in ALL_TO_ALL)
            others = {k: v for k, v in g["counts"].items() if k not in ALL_TO_ALL}
            assert a2a_calls == 4 * n_moe, f"W={world} rank {r}: {g['counts']}"
            assert a2a_bytes == theory, f"W={world} rank {r}: {a2a_bytes} bytes, theory {theory}"
            assert others == {"all_reduce": 1}, f"W={world} rank {r}: {others}"
            rows[world] = (a2a_calls / n_moe, a2a_bytes / n_moe, theory / n_moe)
        table.append(f"W={world}: per MoE layer per update {rows[world][0]:.0f} all-to-alls, "
                     f"{rows[world][1]:,.0f} bytes sent per rank (theory {rows[world][2]:,.0f}); "
                     f"1 all-reduce per forward")  # fmt: skip
    print("\n".join(table))
    # the per-rank volume is the rank's own tokens' buffer: it does not grow with W (only
    # the capacity's rounding up to a multiple of E, at most E - 1 slots per layer)
    for world in (4, 8):
        assert rows[world][1] <= rows[2][1] + world * dim * 4 * 4, table
