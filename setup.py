# Copyright (c) the fairseq-moe plugin authors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""Install the fairseq DeepSpeed-MoE plugin (package ``user``), its entry points, and the
tooling of its scripts (packages ``mt_prep``: data preparation, ``mt_run``: recipes, logs).

Versions are pinned to the set this repository is tested with (see README):
install torch 2.13.0 first, then ``pip install --no-build-isolation .`` so the
fairseq build uses that torch instead of pulling a CUDA build.
"""

from setuptools import find_packages, setup

setup(
    name="fairseq-deepspeed-moe",
    version="0.1.0",
    description="DeepSpeed Mixture-of-Experts Transformers for fairseq translation",
    license="MIT",
    # what is installed and tested (make test). fairseq-fixed also lists 3.12, but nothing
    # here has run on it; before 3.11 pip would pick fairseq 0.12.2, whose save_checkpoint
    # never calls the task's hook (expert shards unrecorded), so those stay out.
    python_requires=">=3.11,<3.12",
    # the plugin, and the tooling scripts/, run.sh and the tests import: data preparation
    # (mt_prep); training recipes and the fairseq log reader (mt_run)
    packages=find_packages(include=["user", "user.*", "mt_prep", "mt_run"]),
    install_requires=[
        "torch==2.13.0",
        # fairseq 0.12.2 does not import on Python >= 3.11 (dataclass mutable defaults);
        # fairseq-fixed is upstream main with that fix, and needs hydra-core 1.3.
        "fairseq-fixed==0.12.3.1",
        "hydra-core==1.3.2",
        "omegaconf==2.3.0",
        "deepspeed==0.19.8",
        "sacremoses==0.2.0",
        "sacrebleu>=2.0,<3",
        "sentencepiece==0.2.3",
        "tensorboard==2.21.0",
        "matplotlib==3.11.2",  # scripts/plot_experts.py and the benchmark plots
        "psutil>=5.9",  # mt_run.processes: a timed-out run's whole process tree is killed
    ],
    extras_require={"test": ["pytest==9.2.0", "pytest-timeout==2.4.0", "ruff==0.17.6"]},
    entry_points={
        "console_scripts": [
            "fairseq-moe-train = user.train:main",
            "fairseq-moe-generate = user.generate:main",
            "fairseq-moe-interactive = user.interactive:main",
        ]
    },
)
