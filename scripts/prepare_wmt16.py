# MIT License
# Copyright (c) the fairseq-moe plugin authors
"""Prepare WMT16 English-German for fairseq, end to end and resumably.

download -> verify -> extract -> raw text (SGML dev/test parsed) -> normalize
-> clean -> sentencepiece -> encode -> ``fairseq-preprocess --joined-dictionary``.

Usually called through ``prepare-wmt16ende.sh``; directly::

    python scripts/prepare_wmt16.py --workspace /data --src en --tgt de

Layout under ``--out`` (default ``WORKSPACE/wmt16_SRC_TGT``): ``raw/`` plain
text (``test.*`` is the untouched newstest2014 for sacrebleu), ``spm/spm.model``,
``encoded/``, ``databin/`` (also holds a copy of ``spm.model``). Archives go
to ``--download-dir`` (default ``WORKSPACE/wmt16_downloads``, shared by both
directions).
"""

import argparse
import os
import sys

import mt_prep

logger = mt_prep.logger

# name -> (default URL, {member path: output name pattern})
ARCHIVES = {
    "europarl": (
        "http://www.statmt.org/wmt13/training-parallel-europarl-v7.tgz",
        {"training/europarl-v7.de-en.{lang}": "europarl.{lang}"},
    ),
    "commoncrawl": (
        "http://www.statmt.org/wmt13/training-parallel-commoncrawl.tgz",
        {"commoncrawl.de-en.{lang}": "commoncrawl.{lang}"},
    ),
    "news-commentary": (
        "http://data.statmt.org/wmt16/translation-task/training-parallel-nc-v11.tgz",
        {"training-parallel-nc-v11/news-commentary-v11.de-en.{lang}": "news-commentary.{lang}"},
    ),
    "dev": (
        "http://data.statmt.org/wmt16/translation-task/dev.tgz",
        {"dev/newstest2013-{role}.{lang}.sgm": "newstest2013.{lang}.sgm"},
    ),
    "test": (
        "http://www.statmt.org/wmt14/test-full.tgz",
        {"test-full/newstest2014-deen-{role}.{lang}.sgm": "newstest2014.{lang}.sgm"},
    ),
}
TRAIN_CORPORA = ("europarl", "commoncrawl", "news-commentary")


def archive_url(name, mirror=None):
    """URL of a WMT archive, on ``mirror`` when given.

    Args:
        name: key of ``ARCHIVES``.
        mirror: base URL replacing the default host and path, or None.
    """
    url = ARCHIVES[name][0]
    return f"{mirror.rstrip('/')}/{url.rsplit('/', 1)[1]}" if mirror else url


def wanted_members(name, src, tgt, extract_dir):
    """Members to extract from one archive for a translation direction.

    For SGML test sets the source side is the ``src`` file and the target
    side the ``ref`` file, as fairseq's WMT example picks them.

    Args:
        name: key of ``ARCHIVES``.
        src: source language.
        tgt: target language.
        extract_dir: where extracted files go.
    """
    out = {}
    for member, target in ARCHIVES[name][1].items():
        for lang, role in ((src, "src"), (tgt, "ref")):
            out[member.format(lang=lang, role=role)] = os.path.join(
                extract_dir, target.format(lang=lang)
            )
    return out


def make_raw(extract_dir, raw_dir, src, tgt, valid):
    """Write ``raw/{train,valid,test}.{src,tgt}`` from the extracted files.

    Args:
        extract_dir: extracted corpora and SGML files.
        raw_dir: output directory.
        src: source language.
        tgt: target language.
        valid: ``newstest2013`` or ``heldout`` (every 100th training line).
    """
    train = {lang: [] for lang in (src, tgt)}
    for corpus in TRAIN_CORPORA:
        sides = {
            lang: mt_prep.read_lines(os.path.join(extract_dir, f"{corpus}.{lang}"))
            for lang in train
        }
        if len(sides[src]) != len(sides[tgt]):
            raise ValueError(
                f"{corpus}: {len(sides[src])} {src} lines vs {len(sides[tgt])} {tgt} lines"
            )
        logger.info("%s: %d lines", corpus, len(sides[src]))
        for lang in train:
            train[lang].extend(sides[lang])
    splits = {"train": train}
    if valid == "heldout":
        keep, held = mt_prep.heldout_split(len(train[src]))
        splits["valid"] = {lang: [lines[i] for i in held] for lang, lines in train.items()}
        splits["train"] = {lang: [lines[i] for i in keep] for lang, lines in train.items()}
    else:
        splits["valid"] = _read_sgml_pair(extract_dir, "newstest2013", src, tgt)
    splits["test"] = _read_sgml_pair(extract_dir, "newstest2014", src, tgt)
    for split, sides in splits.items():
        for lang, lines in sides.items():
            mt_prep.write_lines(os.path.join(raw_dir, f"{split}.{lang}"), lines)
        logger.info("raw %s: %d lines", split, len(sides[src]))


def _read_sgml_pair(extract_dir, name, src, tgt):
    sides = {}
    for lang in (src, tgt):
        with open(os.path.join(extract_dir, f"{name}.{lang}.sgm"), encoding="utf-8") as f:
            sides[lang] = mt_prep.parse_sgml(f.read())
    if len(sides[src]) != len(sides[tgt]) or not sides[src]:
        raise ValueError(f"{name}: {len(sides[src])} {src} vs {len(sides[tgt])} {tgt} segments")
    return sides


def main(argv=None):
    parser = argparse.ArgumentParser(description="Prepare WMT16 En-De for fairseq.")
    parser.add_argument("--workspace", default=os.environ.get("WORKSPACE", "."))
    parser.add_argument("--out", help="output root (default WORKSPACE/wmt16_SRC_TGT)")
    parser.add_argument("--download-dir", help="archives (default WORKSPACE/wmt16_downloads)")
    parser.add_argument("--mirror", default=None, help="base URL serving all archives by file name")
    parser.add_argument(
        "--checksums", default=None, help="sha256sum-style file of known archive digests"
    )
    parser.add_argument("--valid", default="newstest2013", choices=["newstest2013", "heldout"])
    parser.add_argument("--download-attempts", type=int, default=5)
    parser.add_argument("--download-timeout", type=float, default=60.0)
    parser.add_argument(
        "--retry-wait", type=float, default=2.0, help="seconds before the first retry"
    )
    mt_prep.add_common_args(parser, vocab_size=32000)
    args = parser.parse_args(argv)
    mt_prep.setup_logging()
    if {args.src, args.tgt} != {"en", "de"}:
        parser.error("--src/--tgt must be en/de or de/en")

    out = args.out or os.path.join(args.workspace, f"wmt16_{args.src}_{args.tgt}")
    downloads = args.download_dir or os.path.join(args.workspace, "wmt16_downloads")
    extract_dir, raw_dir = os.path.join(out, "extracted"), os.path.join(out, "raw")
    for d in (downloads, extract_dir, raw_dir):
        os.makedirs(d, exist_ok=True)
    checksums = {}
    if args.checksums:
        with open(args.checksums) as f:
            checksums = mt_prep.parse_checksums(f.read())

    pipe = mt_prep.Pipeline(out, stop_after=args.stop_after)
    try:
        paths = {}
        for name in ARCHIVES:
            url = archive_url(name, args.mirror)
            paths[name] = os.path.join(downloads, url.rsplit("/", 1)[1])
        # The archives are verified here, before anything reads them; on a rerun, again
        # when one changed on disk since its check or a checksum given now disagrees.
        pipe.run(
            "fetch",
            {"urls": {n: archive_url(n, args.mirror) for n in ARCHIVES}},
            list(paths.values()),
            lambda: [
                mt_prep.fetch_archive(
                    archive_url(n, args.mirror),
                    p,
                    checksums.get(os.path.basename(p)),
                    attempts=args.download_attempts,
                    timeout=args.download_timeout,
                    backoff=args.retry_wait,
                )
                for n, p in paths.items()
            ],
            fresh=lambda: all(
                mt_prep.verified_sha256(p, checksums.get(os.path.basename(p)))
                for p in paths.values()
            ),
        )
        members = {n: wanted_members(n, args.src, args.tgt, extract_dir) for n in ARCHIVES}
        pipe.run(
            "extract",
            # an archive replaced by another (another digest) is extracted again
            {"archives": {n: mt_prep.verified_sha256(p) for n, p in paths.items()}},
            [p for m in members.values() for p in m.values()],
            lambda: [mt_prep.extract_members(paths[n], m) for n, m in members.items()],
        )
        raw_outputs = [
            os.path.join(raw_dir, f"{s}.{l}")
            for s in ("train", "valid", "test")
            for l in (args.src, args.tgt)
        ]
        pipe.run(
            "raw",
            {"valid": args.valid},
            raw_outputs,
            lambda: make_raw(extract_dir, raw_dir, args.src, args.tgt, args.valid),
        )
        mt_prep.build_from_raw(pipe, raw_dir, out, args)
    except mt_prep.StopPipeline as stop:
        logger.info("stopped after step %s as asked", stop)
    except (mt_prep.DownloadError, mt_prep.CorruptArchiveError) as e:
        logger.error("%s", e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
