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


def good_matches(a, b, ratio=0.85) -> int:
    """Mutual nearest neighbours between two descriptor sets that pass Lowe's ratio test."""
    from delf_retrieval import verify

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
