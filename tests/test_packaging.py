"""What Dataflow workers receive: an sdist with every module, a container that matches the pins and
holds what its setup.py reads, and a launcher that builds the right options."""

import os
import re
import subprocess
import sys
import tarfile

from tests.conftest import REPO_ROOT, assert_shellcheck_clean

PACKAGES = ("delf_retrieval", "pipeline", "transforms")


def pinned(name):
    text = open(os.path.join(REPO_ROOT, "requirements.txt")).read()
    return re.search(rf"^{re.escape(name)}(?:\[[^\]]*\])?==(\S+)$", text, re.M).group(1)


def tree_files(folder: str, suffix: str = "") -> set:
    """Paths (relative to the repository) of the files under ``folder`` ending in ``suffix``."""
    return {os.path.relpath(os.path.join(root, f), REPO_ROOT)
            for root, _, files in os.walk(os.path.join(REPO_ROOT, folder)) for f in files if f.endswith(suffix)}


def sdist(source_dir, dist_dir):
    """(archive, the paths it holds) of ``python setup.py sdist`` run in ``source_dir``."""
    result = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "--dist-dir", str(dist_dir)], cwd=source_dir,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    (archive,) = dist_dir.glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        return archive, {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}


MODULES = set().union(*(tree_files(package, ".py") for package in PACKAGES))


def test_sdist_carries_every_module_and_installs(tmp_path):
    archive, names = sdist(REPO_ROOT, tmp_path)
    assert MODULES - names == set()
    assert {"requirements.txt", "setup.py"} <= names
    # Installs from the archive (what a worker does), without touching the network.
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(archive)], check=True, capture_output=True)
    installed = {os.path.relpath(os.path.join(root, f), target) for root, _, files in os.walk(target)
                 for f in files if f.endswith(".py")}
    assert MODULES - installed == set()
    # The shipped models install beside the packages, where SHIPPED_MODELS_DIR finds them.
    shipped = tree_files("models")
    assert shipped and shipped - names == set() and all((target / path).is_file() for path in shipped)
    found = subprocess.run([sys.executable, "-c", "from delf_retrieval.model import delf; print(delf.head_weights_path("
                            "'lite0-attention'))"], cwd=str(tmp_path), env={**os.environ, "PYTHONPATH": str(target)},
                           capture_output=True, text=True, check=True).stdout.strip()
    assert found == str(target / "models" / "lite0-attention" / "attention.weights.h5")


def image_files(dockerfile: str, context: str, into) -> None:
    """Copy what the Dockerfile's COPY lines take from the build ``context`` into the folder ``into``
    (its WORKDIR), as the image holds it."""
    import shutil

    for line in open(dockerfile).read().splitlines():
        if not line.startswith("COPY ") or "--from" in line:
            continue
        *sources, dest = line.split()[1:]
        for source in sources:
            target = into / dest / os.path.basename(source) if dest.endswith("/") else into / dest
            if os.path.isdir(os.path.join(context, source)):
                shutil.copytree(os.path.join(context, source), target, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(os.path.join(context, source), target)


def test_the_worker_image_holds_what_its_setup_py_reads(tmp_path):
    """The image installs the package from its own copy of the tree (``pip install .``), and the Flex
    Template launcher builds the workers' sdist from that same copy (``--setup_file /opt/delf/setup.py``):
    setup.py must find every file it reads there, and the sdist every module."""
    image = tmp_path / "opt-delf"
    image_files(os.path.join(REPO_ROOT, "Dockerfile"), REPO_ROOT, image)
    (tmp_path / "dist").mkdir()
    _, names = sdist(image, tmp_path / "dist")
    shipped = tree_files("models")
    assert MODULES - names == set() and shipped and shipped - names == set()


def test_worker_container_matches_the_pins():
    dockerfile = open(os.path.join(REPO_ROOT, "Dockerfile")).read()
    base = re.search(r"^FROM apache/beam_python(\d)\.(\d+)_sdk:(\S+)$", dockerfile, re.M)
    assert base and base.group(3) == pinned("apache-beam")
    assert (int(base.group(1)), int(base.group(2))) == sys.version_info[:2]
    # CUDA TensorFlow of exactly the pinned version: the image derives it from requirements.txt.
    assert "sed 's/^tensorflow-cpu==/tensorflow[and-cuda]==/' requirements.txt" in dockerfile
    assert pinned("tensorflow-cpu")
    for package in (*PACKAGES, "models"):
        assert f"COPY {package} ./{package}" in dockerfile


def launcher(*args, env=None):
    return subprocess.run(["bash", os.path.join(REPO_ROOT, "run_dataflow.sh"), *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


def test_dataflow_launcher_builds_the_options():
    result = launcher("--dry-run", "--project", "p1", "--bucket", "b1", "--image", "gcr.io/p1/delf:1",
                      "--input", "gs://b1/train.csv", "--output", "gs://b1/index", "--gpu-type", "nvidia-l4",
                      "--gpu-count", "2", "--max-workers", "7", "--num-shards", "64",
                      env={"GCP_REGION": "europe-west4"})
    assert result.returncode == 0, result.stderr
    command = result.stdout
    for expected in ("--runner DataflowRunner", "--project p1", "--region europe-west4", "--temp_location gs://b1/tmp",
                     "--sdk_container_image gcr.io/p1/delf:1", "--max_num_workers 7", "--num-shards 64",
                     "--machine_type n1-standard-8",
                     "--accelerator type:nvidia-l4\\;count:2\\;machine_type:n1-standard-8\\;install-nvidia-driver",
                     f"--setup_file {REPO_ROOT}/setup.py", "--input gs://b1/train.csv", "--output gs://b1/index"):
        assert expected in command, expected
    # The GPU reaches workers by the hint alone: right fitting and worker_accelerator do not mix.
    assert "worker_accelerator" not in command and "dataflow_service_options" not in command
    missing = launcher("--dry-run", "--project", "p1")
    assert missing.returncode == 2 and "--bucket --image --input --output" in missing.stderr
    assert "--gpu-type" in missing.stderr  # the usage shows the Dataflow settings, from pipeline/dataflow.py


def test_dataflow_launcher_is_shellcheck_clean():
    assert_shellcheck_clean(os.path.join(REPO_ROOT, "run_dataflow.sh"))
