# MIT License
# Copyright (c) the fairseq-moe plugin authors
"""Machine-translation data preparation: fetch, clean, sentencepiece, binarize, score.

Used by ``scripts/prepare_wmt16.py`` (WMT16 En-De) and ``scripts/prepare_demo.py``
(the bundled LibreOffice corpus), which go through the same pipeline from the
normalize step on, and by ``scripts/sacrebleu.sh`` (scoring). It replaces the
Moses perl scripts with sacremoses and sentencepiece's Python API, and makes
every step resumable: downloads resume and are verified before extraction,
every output is written under a temporary name and renamed when complete, and
a step is skipped on a rerun unless its settings (or an earlier step's) changed.

Modules, in pipeline order:

- ``archives``: resumable downloads, archive checks, extraction;
- ``text``: WMT SGML, Moses-style normalization, cleaning, held-out splits;
- ``subword``: sentencepiece training and encoding;
- ``pipeline``: the shared tail (normalize -> ... -> ``fairseq-preprocess``)
  and the options both data scripts take;
- ``steps``: resumable steps with settings signatures;
- ``files``: atomic writes, line I/O;
- ``bleu``: sacreBLEU of a ``fairseq-generate`` output, the copy-the-source baseline.

The names below are the package's interface (``mt_prep.read_lines``, ...).
Every module logs as ``mt_prep``. An installed top-level package (``setup.py``),
so scripts and tests import it without touching ``sys.path``.
"""

from .archives import (
    CorruptArchiveError,
    DownloadError,
    check_archive,
    download,
    extract_members,
    fetch_archive,
    parse_checksums,
    sha256_file,
    verified_sha256,
)
from .bleu import (
    ScoringError,
    copy_source_bleu,
    detokenize,
    join_pieces,
    load_references,
    parse_generate_output,
    score,
)
from .files import atomic_path, count_lines, file_sizes, read_lines, write_lines
from .pipeline import add_common_args, binarize, build_from_raw, setup_logging
from .steps import Pipeline, StopPipeline, logger, signature
from .subword import encode_file, train_sentencepiece
from .text import (
    clean_corpus,
    heldout_split,
    keep_pair,
    normalize_file,
    normalize_line,
    parse_sgml,
    remove_non_printing,
)

__all__ = [
    "CorruptArchiveError",
    "DownloadError",
    "Pipeline",
    "ScoringError",
    "StopPipeline",
    "add_common_args",
    "atomic_path",
    "binarize",
    "build_from_raw",
    "check_archive",
    "clean_corpus",
    "copy_source_bleu",
    "count_lines",
    "detokenize",
    "download",
    "encode_file",
    "extract_members",
    "fetch_archive",
    "file_sizes",
    "heldout_split",
    "join_pieces",
    "keep_pair",
    "load_references",
    "logger",
    "normalize_file",
    "normalize_line",
    "parse_checksums",
    "parse_generate_output",
    "parse_sgml",
    "read_lines",
    "remove_non_printing",
    "score",
    "setup_logging",
    "sha256_file",
    "signature",
    "train_sentencepiece",
    "verified_sha256",
    "write_lines",
]
