"""`fedrec download` against a loopback HTTP server serving a zip made from the shared copy."""

import functools
import http.server
import io
import threading
import zipfile

import pytest

from fedrec.datasets import movielens
from fedrec.errors import DataError
from tests.conftest import movielens_dir


@pytest.fixture
def server(tmp_path):
    src = movielens_dir()
    root = tmp_path / "www"
    root.mkdir()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name in ("u.data", "u.item", "u.user", "README"):
            z.write(src / name, f"ml-100k/{name}")
    (root / "ml-100k.zip").write_bytes(buf.getvalue())
    with zipfile.ZipFile(root / "tampered.zip", "w") as z:
        for name in ("u.item", "u.user"):
            z.write(src / name, f"ml-100k/{name}")
        z.writestr("ml-100k/u.data", "1\t1\t5\t1\n")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_download_verifies_and_unpacks(server, tmp_path):
    dest = tmp_path / "ml"
    assert movielens.download(dest, f"{server}/ml-100k.zip") == dest
    assert (dest / "u.data").is_file()
    assert movielens.load(dest).interactions.height == 55375


def test_checksum_mismatch_leaves_nothing(server, tmp_path):
    dest = tmp_path / "ml"
    with pytest.raises(DataError, match="checksum mismatch for u.data"):
        movielens.download(dest, f"{server}/tampered.zip")
    assert not dest.exists()


def test_offline_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="cannot download MovieLens-100K .* offline"):
        movielens.download(tmp_path / "ml", "http://127.0.0.1:9/ml-100k.zip", timeout=2)


def test_a_named_movielens_folder_without_u_data_is_an_error_not_a_fall_back(tmp_path, monkeypatch):
    """A mistyped data.movielens_dir or FEDREC_MOVIELENS_DIR must not quietly read another copy."""
    good = tmp_path / "good"
    good.mkdir()
    (good / "u.data").write_text("1\t1\t5\t1\n")
    monkeypatch.setattr(movielens, "SHARED_DIR", good)  # a copy the lookup would otherwise find
    monkeypatch.delenv(movielens.ENV_VAR, raising=False)
    assert movielens.resolve_dir() == good
    with pytest.raises(DataError, match=r"typo \(from data.movielens_dir\) has no u.data"):
        movielens.resolve_dir(tmp_path / "typo")
    monkeypatch.setenv(movielens.ENV_VAR, str(tmp_path / "typo2"))
    with pytest.raises(DataError, match=r"typo2 \(from FEDREC_MOVIELENS_DIR\) has no u.data"):
        movielens.resolve_dir()
    assert movielens.resolve_dir(good) == good  # the config's folder comes before the env var's
