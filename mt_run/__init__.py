# MIT License
# Copyright (c) the fairseq-moe plugin authors
"""What the training scripts share: the one reader of fairseq's logs.

- ``fairseq_log``: fairseq's json and simple logs (records, losses by update,
  tokens/s, resume point, training time, generation speed);
- ``wps_table``: ``run.sh bench``'s table.

A sibling of ``mt_prep`` rather than a part of it: ``mt_prep`` turns corpora into
binarized data and needs neither fairseq's training nor the plugin; this package
reads (and describes) training runs. Neither is the plugin (``user/``, loaded by
fairseq with ``--user-dir``). Both are installed top-level packages
(``setup.py``), so scripts and tests import them without touching ``sys.path``;
the bash scripts run ``python -m mt_run.<module>`` from the repository's root
(``run_tool`` in ``scripts/lib.sh``).
"""
