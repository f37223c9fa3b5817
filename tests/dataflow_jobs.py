"""The production Dataflow jobs, translated offline: each entry point (``python -m pipeline.run``,
``pipeline.reindex``, ``pipeline.search``) runs with the options its launcher passes (run_dataflow.sh's
command, the argv the Flex Template launcher makes of schedule_reindex.sh's launch request,
``pipeline.dataflow options --job search``) plus ``--dry_run=True --no_auth``, and stops when
DataflowRunner returns the job it would submit; the job's description is then built as for
submission, its files staged to the local GCS emulator. Used by tests/test_dataflow_jobs.py and
benchmarks/dataflow_stages.py."""

from __future__ import annotations

import contextlib
import json
import os
import runpy
import shlex
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass

from pipeline import dataflow
from tests.conftest import REPO_ROOT, SAMPLES
from tests.job_graph import JobGraph

PROJECT = "delf-dry-run"
IMAGE = "us-central1-docker.pkg.dev/delf-dry-run/delf/delf-worker:dry-run"
TRANSLATE_ONLY = ["--dry_run=True", "--no_auth"]  # build the job, submit nothing, ask for no credentials
SERVICE_ACCOUNT = "reindex@delf-dry-run.iam.gserviceaccount.com"
SMALL_BUILD = ["--scales", "0.5,1.0", "--max-features", "300", "--max-image-size", "640", "--no-progress",
               "--cells", "8", "--weights", "random"]  # the local build of the index the jobs start from


class Translated(BaseException):
    """Raised once DataflowRunner has returned the translated job: it stops the entry point there,
    past ``cli.main``'s handling of failures (a BaseException, as KeyboardInterrupt)."""


@dataclass
class TranslatedJob:
    """One job as Dataflow would receive it: the command that made it, the runner's ``Job`` (its
    pipeline proto, with pickled DoFns, environments and resource hints), the JSON description of
    the job (environment, worker pool, options) and the files staged for it (name -> gs:// path)."""

    name: str
    module: str
    argv: list[str]
    job: object  # apache_beam.runners.dataflow.internal.apiclient.Job
    description: dict
    staged: dict[str, str]
    seconds: float

    @property
    def graph(self) -> JobGraph:
        return JobGraph(self.job.proto_pipeline)


@contextlib.contextmanager
def capturing_results():
    """While open, every pipeline ``pipeline.build.make_pipeline`` makes keeps the result of its run
    in the yielded list and raises ``Translated``."""
    from pipeline import build

    results, make = [], build.make_pipeline

    def make_pipeline(beam_args):
        pipeline, local = make(beam_args)
        run = pipeline.run

        def run_and_stop(*args, **kwargs):
            results.append(run(*args, **kwargs))
            raise Translated

        pipeline.run = run_and_stop
        return pipeline, local

    build.make_pipeline = make_pipeline
    try:
        yield results
    finally:
        build.make_pipeline = make


def translate(name: str, module: str, argv: list[str]) -> TranslatedJob:
    """Run ``python -m module argv --dry_run=True --no_auth`` in this process up to the translated
    job, then describe and stage it (the emulator must be up: STORAGE_EMULATOR_HOST)."""
    from apache_beam.runners.dataflow.internal import apiclient

    from delf_retrieval import storage

    started = time.time()
    saved_argv = sys.argv
    sys.argv = [module, *argv, *TRANSLATE_ONLY]
    try:
        with capturing_results() as results:
            try:
                with warnings.catch_warnings():  # the test has imported the module already
                    warnings.filterwarnings("ignore", "'pipeline.[a-z]+' found in sys.modules", RuntimeWarning)
                    runpy.run_module(module, run_name="__main__", alter_sys=True)
            except Translated:
                pass
            except SystemExit as e:
                raise AssertionError(f"{module} exited with status {e.code} before its job was translated") from None
    finally:
        sys.argv = saved_argv
    assert len(results) == 1, f"{module} ran {len(results)} pipelines"
    job = results[0].job
    # What DataflowApplicationClient.create_job does before it submits: stage the files and the
    # pipeline proto, and describe the job (worker pool, images, options).
    apiclient.DataflowApplicationClient(job.options).create_job_description(job)
    staging = job.options.view_as(apiclient.GoogleCloudOptions).staging_location
    staged = {path.rsplit("/", 1)[-1]: path for path in storage.list_files(staging)}
    return TranslatedJob(name, module, list(argv), job, json.loads(job.json()), staged,
                         round(time.time() - started, 1))


def settings(bucket: str) -> dataflow.DataflowSettings:
    """The settings of the translated jobs: a project id of the right form, the emulator's bucket."""
    return dataflow.DataflowSettings(project=PROJECT, bucket=bucket, image=IMAGE)


def _setting_flags(s: dataflow.DataflowSettings) -> list[str]:
    return ["--project", s.project, "--bucket", s.bucket, "--image", s.image, "--region", s.region,
            "--gpu-type", s.gpu_type, "--gpu-count", str(s.gpu_count), "--machine-type", s.machine_type,
            "--max-workers", str(s.max_workers)]


def run_dataflow_argv(s: dataflow.DataflowSettings, input: str, output: str, *extra: str) -> list[str]:
    """The arguments run_dataflow.sh gives ``python -m pipeline.run`` (from its ``--dry-run``)."""
    result = subprocess.run(["bash", os.path.join(REPO_ROOT, "run_dataflow.sh"), "--dry-run", *_setting_flags(s),
                             "--input", input, "--output", output, *extra], capture_output=True, text=True, check=True)
    command = shlex.split(result.stdout)
    assert command[:3] == ["python", "-m", "pipeline.run"], command
    return command[3:]


def flex_launch_request(s: dataflow.DataflowSettings, input: str, index: str) -> dict:
    """The launch request schedule_reindex.sh gives the Scheduler job (from its ``--dry-run``)."""
    flags = [f for f in _setting_flags(s) if f not in ("--image", s.image)]  # it names the image itself
    result = subprocess.run(["bash", os.path.join(REPO_ROOT, "flex_template", "schedule_reindex.sh"), "--dry-run",
                             "--skip-images", *flags, "--repository", s.image.rsplit("/", 1)[0],
                             "--service-account", SERVICE_ACCOUNT, "--input", input, "--index", index],
                            capture_output=True, text=True, check=True,
                            env={**os.environ, "IMAGE_TAG": s.image.rsplit(":", 1)[1]})
    scheduler = next(shlex.split(line) for line in result.stdout.splitlines() if "scheduler jobs create" in line)
    return json.loads(scheduler[scheduler.index("--message-body") + 1])


def search_options(s: dataflow.DataflowSettings) -> list[str]:
    """``python -m pipeline.dataflow options --job search``: the search's Dataflow options."""
    result = subprocess.run([sys.executable, "-m", "pipeline.dataflow", "options", *_setting_flags(s), "--job",
                             "search"], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    return result.stdout.splitlines()


def upload_photos(gcs: str, folder: str, picks: dict[str, tuple[str, int]]) -> str:
    """Sample photographs under ``gcs/folder``: {name: (scene, index in the scene)}."""
    from delf_retrieval import storage

    for name, (scene, i) in picks.items():
        source = os.path.join(SAMPLES, scene, sorted(os.listdir(os.path.join(SAMPLES, scene)))[i])
        storage.upload(source, f"{gcs}/{folder}/{name}")
    return f"{gcs}/{folder}"


def translate_all(gcs: str) -> dict[str, TranslatedJob]:
    """Every production job, translated: the full and the fixed-quantizer build (pipeline.run), the
    nightly re-index (incremental, on an index built here first, locally) and the batch search."""
    from delf_retrieval import storage
    from delf_retrieval.index import layout
    from pipeline import run as run_job

    s = settings(gcs[len("gs://"):].split("/", 1)[0])
    photos = upload_photos(gcs, "photos", {"berlin/a.jpg": ("berlin_cathedral", 0), "lund/a.jpg": ("lund_street", 0),
                                           "sacre/a.jpg": ("sacre_coeur", 0)})
    nightly = f"{gcs}/indexes/nightly"
    # Built here, locally, with a neighbour table: the nightly run keeps it up to date.
    assert run_job.run(["--input", photos, "--output", nightly, "--verified-neighbours", "3"] + SMALL_BUILD) == 0
    manifest = layout.read_manifest(nightly)
    for name in ("pca", "quantizer"):
        storage.write_bytes(f"{gcs}/quantizer/{name}.npz",
                            storage.read_bytes(layout.resolve(nightly, manifest["codebooks"][name]["path"])))
    upload_photos(gcs, "photos", {"berlin/b.jpg": ("berlin_cathedral", 1)})  # the day's new image
    jobs = {}
    jobs["full build"] = translate("full build", "pipeline.run",
                                   run_dataflow_argv(s, photos, f"{gcs}/indexes/full"))
    jobs["fixed-quantizer build"] = translate("fixed-quantizer build", "pipeline.run",
                                              run_dataflow_argv(s, photos, f"{gcs}/indexes/fixed", "--quantizer",
                                                                f"{gcs}/quantizer"))
    request = flex_launch_request(s, photos, nightly)
    # The launcher's argv, with this checkout's setup.py for the template image's copy of it.
    jobs["nightly re-index"] = translate("nightly re-index", "pipeline.reindex",
                                         dataflow.flex_launcher_argv(request, s.project, s.region, s.setup_file))
    jobs["batch search"] = translate("batch search", "pipeline.search",
                                     ["--index", nightly, f"{photos}/lund/a.jpg", f"{photos}/berlin/b.jpg",
                                      "--output", f"{gcs}/results/search.json",
                                      *search_options(s)])
    return jobs
