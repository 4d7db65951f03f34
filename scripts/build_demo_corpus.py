# MIT License
# Copyright (c) the fairseq-moe plugin authors
"""Build the bundled English-German demo corpus from Debian's LibreOffice packages.

WMT data cannot be downloaded where CI runs, so the repository ships a small
real parallel corpus made from LibreOffice's help pages (paragraphs share ids
across languages) and its German UI catalogs (msgid English -> msgstr German).
Everything comes from three Debian packages fetched with ``apt-get download``
and unpacked with ``dpkg-deb -x`` (nothing is installed).

Usage::

    apt-get update
    python scripts/build_demo_corpus.py --out data/demo

writes ``{train,valid,test}.{en,de}.gz`` and ``SOURCES`` (package versions).
The output is deterministic for a given set of package versions and seed.
"""

import argparse
import gettext
import glob
import gzip
import html
import html.parser
import logging
import os
import random
import re
import subprocess
import sys
import tempfile
import unicodedata

logger = logging.getLogger("build_demo_corpus")

PACKAGES = ("libreoffice-help-en-us", "libreoffice-help-de", "libreoffice-l10n-de")
HELP_DIR = "usr/share/libreoffice/help"
MO_DIR = "usr/lib/libreoffice/program/resource/de/LC_MESSAGES"
PARA_ID = re.compile(r"^(par|hd)_id\w+$")
PARA_TAGS = {"p", "h1", "h2", "h3", "h4", "h5", "h6"}
SKIP_TAGS = {"script", "style"}
INLINE_TAGS = {
    "a",
    "span",
    "b",
    "i",
    "em",
    "strong",
    "code",
    "kbd",
    "samp",
    "var",
    "sub",
    "sup",
    "u",
}
VOID_TAGS = {"br", "img", "input", "meta", "link", "hr", "wbr", "col", "area", "source"}
PLACEHOLDER = re.compile(r"%[A-Z]+(?:NAME|VERSION)|\$\(ARG\d+\)|%\d+|%[sdu]|\$\w+\$|\{\w+\}|%\w+%")
SENTENCE_END = re.compile(r"[.!?:]$")


def normalize_text(text):
    """Collapse whitespace and normalise Unicode to NFC.

    Args:
        text: raw text.

    Returns:
        the text on one line, without leading or trailing blanks.
    """
    text = unicodedata.normalize("NFC", text.replace("\u00a0", " "))
    return " ".join(text.split())


class HelpParagraphParser(html.parser.HTMLParser):
    """Collect the text of the id-bearing paragraphs and headings of a help page.

    The platform-dependent ``switchinline`` spans hold one hidden variant per
    platform; only the ``default...`` variant is kept so that English and German
    read the same menu path once.
    """

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.paragraphs = {}
        self.duplicates = set()
        self._stack = []  # (tag, starts_capture, skip)
        self._current = None
        self._parts = []
        self._skip = 0

    def handle_starttag(self, tag, attrs):
        self._break(tag)
        if tag in VOID_TAGS:
            return
        attrs = dict(attrs)
        starts = False
        skip = tag in SKIP_TAGS or (
            "hidden" in attrs and not (attrs.get("id") or "").startswith("default")
        )
        if self._current is None and tag in PARA_TAGS and PARA_ID.match(attrs.get("id") or ""):
            self._current, self._parts, starts = attrs["id"], [], True
        self._stack.append((tag, starts, skip))
        self._skip += skip

    def handle_endtag(self, tag):
        self._break(tag)
        if tag in VOID_TAGS:
            return
        # Pop to the matching tag: the help HTML is well formed, but be lenient.
        while self._stack:
            open_tag, starts, skip = self._stack.pop()
            self._skip -= skip
            if starts:
                self._finish()
            if open_tag == tag:
                break

    def _break(self, tag):
        # Block elements inside a paragraph (lists, line breaks) separate words.
        if self._current is not None and tag not in INLINE_TAGS:
            self._parts.append(" ")

    def handle_data(self, data):
        if self._current is not None and not self._skip:
            self._parts.append(data)

    def _finish(self):
        key, text = self._current, normalize_text("".join(self._parts))
        self._current, self._parts = None, []
        if key in self.paragraphs:
            self.duplicates.add(key)
        self.paragraphs[key] = text


def parse_help_page(path):
    """Return ``{paragraph id: text}`` for one help page, ids used twice dropped.

    Args:
        path: an HTML file of the LibreOffice offline help.
    """
    parser = HelpParagraphParser()
    with open(path, encoding="utf-8") as f:
        parser.feed(f.read())
    parser.close()
    return {k: v for k, v in parser.paragraphs.items() if k not in parser.duplicates}


def help_pairs(root):
    """Yield ``(en, de)`` paragraph pairs aligned by help file and paragraph id.

    Args:
        root: directory where the help packages were unpacked.
    """
    en_root = os.path.join(root, HELP_DIR, "en-US")
    de_root = os.path.join(root, HELP_DIR, "de")
    for en_path in sorted(glob.glob(os.path.join(en_root, "text", "**", "*.html"), recursive=True)):
        de_path = os.path.join(de_root, os.path.relpath(en_path, en_root))
        if not os.path.exists(de_path):
            continue
        en, de = parse_help_page(en_path), parse_help_page(de_path)
        for key, en_text in en.items():
            if key in de:
                yield en_text, de[key]


def strip_ui_markup(text):
    """Remove accelerator markers and expand the product placeholder of a UI string.

    Args:
        text: a msgid or msgstr of a LibreOffice UI catalog.
    """
    text = text.replace("~", "").replace("%PRODUCTNAME", "LibreOffice")
    # A single underscore before a letter is a GTK mnemonic ("_Open"), not content.
    if text.count("_") == 1:
        text = re.sub(r"_(?=\w)", "", text)
    return normalize_text(html.unescape(re.sub(r"<[^>]+>", "", text)))


def ui_pairs(root):
    """Yield ``(en, de)`` pairs from the German ``.mo`` catalogs of the UI.

    Args:
        root: directory where ``libreoffice-l10n-de`` was unpacked.
    """
    for path in sorted(glob.glob(os.path.join(root, MO_DIR, "*.mo"))):
        with open(path, "rb") as f:
            catalog = gettext.GNUTranslations(f)._catalog
        for key, value in sorted(catalog.items(), key=lambda kv: str(kv[0])):
            if not isinstance(key, str) or not key:
                continue  # plural forms are keyed (msgid, n); the header by ""
            msgid = key.split("\x04", 1)[-1]  # drop the msgctxt
            yield strip_ui_markup(msgid), strip_ui_markup(value)


def keep_pair(en, de, max_words=120, ratio=2.0):
    """Decide whether a pair is worth training on.

    Args:
        en: English side.
        de: German side.
        max_words: longest side allowed, in whitespace words.
        ratio: largest allowed length ratio between the sides (in words) for
            pairs longer than three words.

    Returns:
        True for a non-empty, non-identical, textual pair of sane length.
    """
    if not en or not de or en == de:
        return False
    for side in (en, de):
        if not re.search(r"[^\W\d_]{2}", PLACEHOLDER.sub("", side)):
            return False  # numbers, symbols or placeholders only
    n_en, n_de = len(en.split()), len(de.split())
    if max(n_en, n_de) > max_words:
        return False
    if min(n_en, n_de) > 3 and max(n_en, n_de) > ratio * min(n_en, n_de):
        return False
    return True


def is_full_sentence(text, min_words=5, max_words=60):
    """Whether a line reads like one complete sentence (for valid and test).

    Args:
        text: one side of a pair.
        min_words: fewest words.
        max_words: most words.
    """
    words = text.split()
    return (
        min_words <= len(words) <= max_words
        and text[0].isupper()
        and SENTENCE_END.search(text) is not None
        and PLACEHOLDER.search(text) is None
    )


def split_corpus(pairs, n_valid=1000, n_test=1000, seed=1):
    """Split de-duplicated pairs into train, valid and test without overlap.

    Valid and test are drawn from full-sentence pairs; any training pair whose
    English or German side appears in valid or test is removed from train.

    Args:
        pairs: list of unique ``(en, de)`` pairs.
        n_valid: valid size.
        n_test: test size.
        seed: shuffling seed.

    Returns:
        dict ``{"train": [...], "valid": [...], "test": [...]}``.
    """
    rng = random.Random(seed)
    pairs = sorted(set(pairs))
    rng.shuffle(pairs)
    held, seen_en, seen_de = [], set(), set()
    for en, de in pairs:
        if len(held) == n_valid + n_test:
            break
        if (
            is_full_sentence(en)
            and is_full_sentence(de)
            and en not in seen_en
            and de not in seen_de
        ):
            held.append((en, de))
            seen_en.add(en)
            seen_de.add(de)
    assert len(held) == n_valid + n_test, f"only {len(held)} held-out candidates"
    held_set = set(held)
    train = [p for p in pairs if p not in held_set and p[0] not in seen_en and p[1] not in seen_de]
    return {"train": train, "valid": held[:n_valid], "test": held[n_valid:]}


def fetch_packages(workdir):
    """Download and unpack the LibreOffice packages; return their versions.

    Args:
        workdir: scratch directory (the ``.deb`` files and the tree go there).
    """
    subprocess.run(["apt-get", "download", *PACKAGES], cwd=workdir, check=True)
    versions = {}
    root = os.path.join(workdir, "root")
    for deb in sorted(glob.glob(os.path.join(workdir, "*.deb"))):
        fields = subprocess.run(
            ["dpkg-deb", "-f", deb, "Package", "Version"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        name, version = (line.split(": ", 1)[1] for line in fields.strip().splitlines())
        versions[name] = version
        subprocess.run(["dpkg-deb", "-x", deb, root], check=True)
    return root, versions


def write_gz(path, lines):
    """Write lines to a reproducible gzip file (no name or time in the header).

    Args:
        path: output path.
        lines: strings without newlines.
    """
    with open(path, "wb") as raw:
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as f:
            f.write("".join(line + "\n" for line in lines).encode("utf-8"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", default=os.path.join(os.path.dirname(__file__), "..", "data", "demo")
    )
    parser.add_argument("--root", help="an already unpacked tree (skips apt-get download)")
    parser.add_argument("--n-valid", type=int, default=1000)
    parser.add_argument("--n-test", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s | %(levelname)s | %(name)s | %(message)s"
    )

    with tempfile.TemporaryDirectory(prefix="lo-demo-") as tmp:
        root, versions = (args.root, {}) if args.root else fetch_packages(tmp)
        help_list = list(help_pairs(root))
        ui_list = list(ui_pairs(root))
    logger.info("aligned %d help paragraphs and %d UI strings", len(help_list), len(ui_list))
    pairs = {p for p in help_list + ui_list if keep_pair(*p)}
    logger.info("%d unique pairs after filtering", len(pairs))
    splits = split_corpus(list(pairs), args.n_valid, args.n_test, args.seed)

    os.makedirs(args.out, exist_ok=True)
    for split, split_pairs in splits.items():
        logger.info("%s: %d pairs", split, len(split_pairs))
        for i, lang in enumerate(("en", "de")):
            write_gz(os.path.join(args.out, f"{split}.{lang}.gz"), [p[i] for p in split_pairs])
    if versions:
        with open(os.path.join(args.out, "SOURCES"), "w") as f:
            f.write("".join(f"{name} {version}\n" for name, version in sorted(versions.items())))


if __name__ == "__main__":
    sys.exit(main())
