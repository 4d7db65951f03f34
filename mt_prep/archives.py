# MIT License
# Copyright (c) the fairseq-moe plugin authors
"""Archives: download them resumably, check them before anything reads them, extract.

Downloads resume with HTTP ``Range`` (within a call and across runs) and an
archive is verified before extraction: the whole gzip/tar stream is read,
and a sha256 is compared when known. A passed check is recorded beside the
archive (``<archive>.verified``), so a rerun checks again only an archive that
changed on disk since, or whose expected digest is new.
"""

import gzip
import hashlib
import http.client
import json
import logging
import os
import shutil
import tarfile
import time
import urllib.error
import urllib.request
import zlib

from .files import atomic_path, remove_path, write_lines

logger = logging.getLogger("mt_prep")


def parse_checksums(text):
    """Parse ``sha256sum`` output into ``{file name: hex digest}``.

    Args:
        text: lines ``<hex>  <name>``; blank lines and ``#`` comments ignored.
    """
    sums = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            digest, name = line.split(None, 1)
            sums[os.path.basename(name.lstrip("*"))] = digest.lower()
    return sums


class DownloadError(RuntimeError):
    """A file could not be downloaded."""


class CorruptArchiveError(RuntimeError):
    """An archive failed its integrity check."""


def download(url, dest, attempts=5, timeout=60.0, backoff=1.0):
    """Download ``url`` to ``dest``, resuming a partial ``dest.part`` with HTTP Range.

    A connection that breaks midway is retried from where it stopped, within
    this call and across runs (the ``.part`` file is kept). ``dest`` appears
    only once the body is complete.

    Args:
        url: http(s) or file URL.
        dest: final path.
        attempts: connection attempts before giving up.
        timeout: socket timeout in seconds.
        backoff: seconds to wait after the first failure (doubles each time).
    """
    part = dest + ".part"
    last_error = None
    for attempt in range(1, attempts + 1):
        have = os.path.getsize(part) if os.path.exists(part) else 0
        headers = {"User-Agent": "fairseq-moe-prepare/1.0"}
        if have:
            headers["Range"] = f"bytes={have}-"
        try:
            request = urllib.request.Request(url, headers=headers)
            with urllib.request.urlopen(request, timeout=timeout) as resp:
                status = getattr(resp, "status", 200)
                length = resp.headers.get("Content-Length")
                if have and status == 206:
                    logger.info("resuming %s at byte %d", os.path.basename(dest), have)
                    mode = "ab"
                else:
                    have, mode = 0, "wb"
                total = have + int(length) if length is not None else None
                _copy_with_progress(resp, part, mode, have, total, os.path.basename(dest))
            size = os.path.getsize(part)
            if total is not None and size != total:
                raise DownloadError(f"connection closed at byte {size} of {total}")
            os.replace(part, dest)
            return
        except urllib.error.HTTPError as e:
            if e.code == 416 and have:
                # The partial file is not a prefix the server can continue.
                logger.warning("server refused to resume %s; starting over", url)
                os.remove(part)
                last_error = e
            elif 400 <= e.code < 500:
                raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from e
            else:
                last_error = e
        except (urllib.error.URLError, http.client.HTTPException, OSError, DownloadError) as e:
            last_error = e
        if attempt < attempts:
            wait = backoff * 2 ** (attempt - 1)
            logger.warning(
                "download of %s interrupted (%s); retry %d/%d in %.1fs",
                url,
                last_error,
                attempt,
                attempts - 1,
                wait,
            )
            time.sleep(wait)
    raise DownloadError(f"{url}: giving up after {attempts} attempts: {last_error}")


def _copy_with_progress(resp, path, mode, have, total, label, chunk=1 << 20):
    done, last_log = have, time.time()
    with open(path, mode) as f:
        while True:
            block = resp.read(chunk)
            if not block:
                break
            f.write(block)
            done += len(block)
            if time.time() - last_log > 10:
                last_log = time.time()
                if total:
                    logger.info("%s: %.1f%% of %.1f MB", label, 100 * done / total, total / 1e6)
                else:
                    logger.info("%s: %.1f MB", label, done / 1e6)


def sha256_file(path):
    """Hex sha256 of a file.

    Args:
        path: file path.
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_archive(path, sha256=None):
    """Verify a ``.tgz``: optional checksum, then read every member to the end.

    Args:
        path: archive path.
        sha256: expected hex digest, or None when unknown.

    Returns:
        the member names.

    Raises:
        CorruptArchiveError: checksum mismatch, truncated or damaged stream.
    """
    if sha256:
        actual = sha256_file(path)
        if actual != sha256.lower():
            raise CorruptArchiveError(f"{path}: sha256 {actual} does not match expected {sha256}")
    names = []
    try:
        with open(path, "rb") as raw:
            is_gzip = raw.read(2) == b"\x1f\x8b"
            raw.seek(0)
            stream = gzip.GzipFile(fileobj=raw) if is_gzip else raw
            with tarfile.open(fileobj=stream, mode="r|") as tar:
                for member in tar:
                    names.append(member.name)
                    if member.isfile():
                        f = tar.extractfile(member)
                        while f.read(1 << 20):
                            pass
            # tarfile stops at its end-of-archive blocks; only reading the
            # gzip stream to its end checks the CRC and length in the trailer.
            while stream.read(1 << 20):
                pass
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise CorruptArchiveError(f"{path}: {type(e).__name__}: {e}") from e
    if not names:
        raise CorruptArchiveError(f"{path}: archive is empty")
    return names


def _identity(path):
    # what changes when the file is replaced or rewritten, without reading it
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}


def _record(path):
    return path + ".verified"


def verified_sha256(path, sha256=None):
    """The sha256 of an archive that passed :func:`check_archive` and is unchanged since.

    Args:
        path: archive path.
        sha256: expected hex digest, or None when unknown.

    Returns:
        the digest recorded by its last check, or None when it was never checked, has
        changed since (size, mtime or inode), or ``sha256`` is not that digest.
    """
    try:
        with open(_record(path)) as f:
            record = json.load(f)
        current = _identity(path)
    except (OSError, ValueError):
        return None
    if {k: record.get(k) for k in current} != current:
        return None
    if sha256 and record.get("sha256") != sha256.lower():
        return None
    return record.get("sha256")


def fetch_archive(url, dest, sha256=None, **download_kwargs):
    """Download and verify an archive, fetching it once more if it is corrupt.

    An archive already on disk is checked again only when :func:`verified_sha256`
    does not vouch for it (it changed, or ``sha256`` is new); a damaged one is
    deleted and fetched again.

    Args:
        url: where to get it.
        dest: local path.
        sha256: expected digest, or None.
        download_kwargs: passed to ``download``.

    Returns:
        the archive's sha256.

    Raises:
        CorruptArchiveError: the second copy is corrupt too.
    """
    for attempt in (1, 2):
        if not os.path.exists(dest):
            logger.info("downloading %s", url)
            download(url, dest, **download_kwargs)
        digest = verified_sha256(dest, sha256)
        if digest:
            return digest
        try:
            identity = _identity(dest)
            check_archive(dest, sha256)
            digest = sha256.lower() if sha256 else sha256_file(dest)
            write_lines(_record(dest), [json.dumps({**identity, "sha256": digest})])
            logger.info("%s: integrity check passed", os.path.basename(dest))
            return digest
        except CorruptArchiveError as e:
            remove_path(dest)
            remove_path(_record(dest))
            if attempt == 2:
                raise CorruptArchiveError(
                    f"{e}\nThe archive is corrupt again after a fresh download from {url}; "
                    "check the mirror (WMT_MIRROR) or the checksum list."
                ) from e
            logger.warning("corrupt archive (%s); deleting it and fetching it again", e)


def _normalise_member(name):
    return name[2:] if name.startswith("./") else name


def extract_members(archive, wanted):
    """Extract selected members of a tar archive to chosen paths, atomically.

    A member is matched by its path, or else by its unique base name (mirrors
    sometimes repack archives with another top folder).

    Args:
        archive: tar path.
        wanted: ``{member path: destination path}``.
    """
    with tarfile.open(archive, "r:*") as tar:
        members = [m for m in tar.getmembers() if m.isfile()]
        by_name = {_normalise_member(m.name): m for m in members}
        for name, dest in wanted.items():
            member = by_name.get(name)
            if member is None:
                base = os.path.basename(name)
                candidates = [m for m in members if os.path.basename(m.name) == base]
                if len(candidates) != 1:
                    listing = ", ".join(sorted(by_name)[:20])
                    raise CorruptArchiveError(f"{archive}: no member {name} (has: {listing})")
                member = candidates[0]
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            with atomic_path(dest) as tmp:
                with tar.extractfile(member) as src, open(tmp, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
