# Copyright (c) the fairseq-moe plugin authors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""Helpers shared by tests: build a tiny model through fairseq's parser and task."""

import re

import torch
from fairseq import options, tasks

# fmt: off
TINY = ["--encoder-embed-dim", "16", "--decoder-embed-dim", "16", "--encoder-ffn-embed-dim", "32",
        "--decoder-ffn-embed-dim", "24", "--encoder-attention-heads", "2",
        "--decoder-attention-heads", "2", "--encoder-layers", "2", "--decoder-layers", "2"]
# fmt: on

#: Attention key biases get no gradient in exact arithmetic (softmax ignores a shift
#: shared by all keys), only rounding noise, which Adam scales up to full-size steps:
#: runs that split a batch differently agree on every weight but these.
KEY_BIAS = re.compile(r"\.k_proj\.bias$")


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
