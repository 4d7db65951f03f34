# Copyright (c) the fairseq-moe plugin authors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""Helpers shared by tests: build a tiny model through fairseq's parser and task; an
MoE layer whose routing and outputs can be checked by hand."""

import re

import torch
from fairseq import options, tasks

from user import ds_moe
from user.modules.moe_ffn import ExpertFFN, MoEFeedForward
from user.moe_options import MoEOptions

# fmt: off
TINY = ["--encoder-embed-dim", "16", "--decoder-embed-dim", "16", "--encoder-ffn-embed-dim", "32",
        "--decoder-ffn-embed-dim", "24", "--encoder-attention-heads", "2",
        "--decoder-attention-heads", "2", "--encoder-layers", "2", "--decoder-layers", "2"]
# fmt: on

#: Attention key biases get no gradient in exact arithmetic (softmax ignores a shift
#: shared by all keys), only rounding noise, which Adam scales up to full-size steps:
#: runs that split a batch differently agree on every weight but these.
KEY_BIAS = re.compile(r"\.k_proj\.bias$")


#: the hand-checkable layer's experts and model width
E, C = 4, 4


def hand_checkable_layer(fast_dispatch=None, **kw):
    """An MoE layer (one process) whose expert e computes ``(e + 1) * x`` on positive
    inputs and whose router's logits are ``3 * x``, so each token's expert, gate
    probability and output are known (as fairscale's MoE tests do).

    Args:
        fast_dispatch (bool, optional): the local path (True) or the buffer path (False);
            None keeps the layer's default.
        kw: :class:`MoEOptions` fields.
    """
    kw = {"min_capacity": 0, "use_rts": False, "top2_2nd_expert_sampling": False, **kw}
    opts = MoEOptions(sides=frozenset({"enc"}), num_experts=E, **kw)
    layer = MoEFeedForward(C, ExpertFFN(C, C), opts, "encoder.0", seed=1)
    with torch.no_grad():
        for e, expert in enumerate(ds_moe.local_experts(layer.moe)):
            expert.fc1.weight.copy_(torch.eye(C))
            expert.fc1.bias.zero_()
            expert.fc2.weight.copy_(torch.eye(C) * (e + 1))
            expert.fc2.bias.zero_()
        ds_moe.moe_gate(layer.moe).wg.weight.copy_(torch.eye(E) * 3)
    if fast_dispatch is not None:
        layer.fast_dispatch = fast_dispatch
    return layer


def build(tiny_data, arch, *extra, seed=1):
    parser = options.get_training_parser()
    # fmt: off
    args = options.parse_args_and_arch(parser, [
        str(tiny_data["databin"]), "--task", "translation_deepspeed", "--arch", arch,
        "--seed", str(seed), *TINY, *extra])
    # fmt: on
    task = tasks.setup_task(args)
    torch.manual_seed(seed)
    return task, task.build_model(args)


def sample_batch(task, n=4):
    task.load_dataset("valid")
    ds = task.dataset("valid")
    return ds.collater([ds[i] for i in range(n)])
