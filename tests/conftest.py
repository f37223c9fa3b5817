"""Shared fixtures: a per-session weight cache, the converted light network, the dev photographs."""

import contextlib
import functools
import http.server
import os
import threading

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLES = os.path.join(REPO_ROOT, "samples")
LANDMARKS_DEV = os.path.join(os.path.dirname(REPO_ROOT), "shared", "data", "landmarks-dev")


pytest_plugins = ("tests.ci_skips",)  # under CI=true, a skip other than for ../shared fails the run


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """A weight cache private to the test session (the converted ImageNet weights land here)."""
    path = str(tmp_path_factory.mktemp("weights-cache"))
    os.environ["DELF_CACHE_DIR"] = path
    return path


@pytest.fixture(scope="session")
def lite_net(cache_dir):
    from delf_retrieval.model import delf

    return delf.load(delf.ModelConfig(backbone="efficientnet_lite0", keypoint_score="l2norm"), cache_dir=cache_dir)


@pytest.fixture(scope="session")
def landmarks_dev():
    if not os.path.isdir(LANDMARKS_DEV):
        pytest.skip("../shared/data/landmarks-dev is not present (a user's clone has no ../shared)")
    return LANDMARKS_DEV


def sample_path(*parts):
    return os.path.join(SAMPLES, *parts)


# Cheap extraction for the index builds of tests (pipeline.run and pipeline.reindex flags).
FAST = ["--scales", "0.5,1.0", "--max-features", "300", "--max-image-size", "640", "--no-progress"]
SMALL = FAST + ["--cells", "8"]


def corpus_of(folder, picks):
    """Copies of sample photographs: {relative name in the corpus: (scene, index in the scene)}."""
    import shutil

    for name, (scene, i) in picks.items():
        os.makedirs(os.path.dirname(folder / name), exist_ok=True)
        shutil.copy(os.path.join(SAMPLES, scene, sorted(os.listdir(os.path.join(SAMPLES, scene)))[i]), folder / name)
    return folder


def reindex_run(corpus, root, *extra):
    """pipeline.reindex of ``corpus`` into ``root`` with the cheap settings; its exit status."""
    from pipeline import reindex

    argv = ["--input", str(corpus), "--index", str(root), "--keep", "2"] + SMALL + list(extra)
    return reindex.run(argv)


@pytest.fixture(scope="session")
def built(tmp_path_factory, cache_dir):
    """A small corpus (one photograph of Berlin cathedral, two of a Lund street, one of Sacre-Coeur)
    and its versioned index, built once per session and never changed (tests copy the root)."""
    base = tmp_path_factory.mktemp("reindex-base")
    corpus = corpus_of(base / "corpus", {"berlin/a.jpg": ("berlin_cathedral", 0), "lund/a.jpg": ("lund_street", 0),
                                         "lund/b.jpg": ("lund_street", 1), "sacre/a.jpg": ("sacre_coeur", 0)})
    assert reindex_run(corpus, base / "index") == 0
    return corpus, base / "index"


def good_matches(a, b, ratio=0.85) -> int:
    """Mutual nearest neighbours between two descriptor sets that pass Lowe's ratio test."""
    from delf_retrieval.query import verify

    return len(verify.mutual_nearest_neighbours(a, b, ratio=ratio))


def assert_shellcheck_clean(script: str) -> None:
    """ShellCheck finds nothing in ``script``; skips where shellcheck is not installed."""
    import shutil
    import subprocess

    if not shutil.which("shellcheck"):
        pytest.skip("shellcheck is not installed (.ci/run installs it)")
    result = subprocess.run(["shellcheck", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


@contextlib.contextmanager
def emulated_gcs(emulator):
    """While open, a local Google Cloud Storage emulator (``emulator``: the gcp_storage_emulator.server
    module, run in this process) with a bucket ``test-bucket``, which google-cloud-storage and Beam's
    gs:// reach via STORAGE_EMULATOR_HOST; yields the bucket's gs:// root."""
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    server = emulator.create_server("localhost", port, in_memory=True, default_bucket="test-bucket")
    server.start()
    previous = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = f"http://localhost:{port}"
    from delf_retrieval import storage

    storage._client.cache_clear()
    try:
        yield "gs://test-bucket"
    finally:
        server.stop()
        storage._client.cache_clear()
        if previous is None:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = previous


@pytest.fixture(scope="session")
def gcs_emulator():
    """The GCS emulator of ``emulated_gcs`` for the test session."""
    with emulated_gcs(pytest.importorskip("gcp_storage_emulator.server")) as root:
        yield root


@contextlib.contextmanager
def serving(directory):
    """An HTTP server on loopback serving ``directory``; yields its base URL."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=directory)
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", server
    finally:
        server.shutdown()
        server.server_close()
