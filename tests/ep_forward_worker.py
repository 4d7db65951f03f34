# Copyright (c) the fairseq-moe plugin authors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""Run under ``torchrun``: load an expert-parallel checkpoint into this rank's
part of the model (``user.checkpoint.fairseq_hooks.load_for_rank``), run the model on the
first validation sentences and save the output as ``OUT_DIR/rank<r>.pt``.

    torchrun --nproc_per_node 2 tests/ep_forward_worker.py CKPT OUT_DIR N
"""

import os
import sys
from argparse import Namespace
from pathlib import Path

import torch
import torch.distributed as dist

USER_DIR = Path(__file__).resolve().parents[1] / "user"


def main(ckpt: str, out_dir: str, n: int) -> None:
    dist.init_process_group("gloo")
    from fairseq import tasks, utils
    from omegaconf import OmegaConf

    utils.import_user_module(Namespace(user_dir=str(USER_DIR)))
    from user.checkpoint import fairseq_hooks
    from user.checkpoint.format import SHARD_KEY

    raw = torch.load(ckpt, map_location="cpu", weights_only=False)
    cfg = OmegaConf.create(raw["cfg"], flags={"allow_objects": True})
    ep = raw["extra_state"][SHARD_KEY]["ep_size"]
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    model.eval()
    fairseq_hooks.load_for_rank(ckpt, model, dist.get_rank() % ep, ep)
    task.load_dataset("valid")
    ds = task.dataset("valid")
    sample = ds.collater([ds[i] for i in range(n)])
    with torch.no_grad():
        out = model(**sample["net_input"])[0]
    torch.save(out, os.path.join(out_dir, f"rank{dist.get_rank()}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
