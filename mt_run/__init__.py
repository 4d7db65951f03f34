# MIT License
# Copyright (c) the fairseq-moe plugin authors
"""What the training scripts share: the recipes and the one reader of fairseq's logs.

- ``recipes``: the tiny (CPU, ``make demo``) and WMT training recipes, and the
  micro model of the fault and expert-parallel tests, for ``run.sh``,
  ``scripts/demo.sh``, ``scripts/bench.py``, ``scripts/bench_perf.py``,
  ``scripts/fault_run.py`` and the tests;
- ``fairseq_log``: fairseq's json and simple logs (records, losses by update,
  tokens/s, resume point, training time, generation speed);
- ``wps_table``: ``run.sh bench``'s table;
- ``processes``: run a command (torchrun, a launcher) so that a timeout or an
  interruption kills its whole process tree, torchrun's workers included.

A sibling of ``mt_prep`` rather than a part of it: ``mt_prep`` turns corpora into
binarized data and needs neither fairseq's training nor the plugin; this package
describes and reads training runs. Neither is the plugin (``user/``, loaded by
fairseq with ``--user-dir``). Both are installed top-level packages
(``setup.py``), so scripts and tests import them without touching ``sys.path``;
the bash scripts run ``python -m mt_run.<module>`` from the repository's root
(``run_tool`` in ``scripts/lib.sh``), so they read their own checkout's recipes.
"""
