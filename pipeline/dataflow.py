"""The Dataflow options of the production jobs, in one place: ``run_dataflow.sh`` (the index build),
the nightly re-index's Flex Template launch request (``flex_template/schedule_reindex.sh``) and the
tests that translate each job offline (``tests/test_dataflow_jobs.py``) all take them from here.

    python -m pipeline.dataflow options --project ID --bucket NAME --image URI [settings] [--job search]
    python -m pipeline.dataflow flex-launch --project ID --bucket NAME --image URI --input SRC --index ROOT \\
        --job-name NAME --template-spec gs://... --service-account SA [settings]

``options`` prints the Beam and job options of a job, one a line; ``flex-launch`` prints three lines:
the region, the URL of the ``flexTemplates:launch`` call and the body of the request (JSON), which
carries the same options. The GPU reaches workers only as a Beam resource hint (Dataflow's right
fitting, ``--accelerator``) on the steps from reading an image to its codes; Dataflow's
documentation says not to combine right fitting with the ``worker_accelerator`` service option, so
neither launcher passes it (docs/dataflow.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU_PRESET = "lite-gpu"  # the extraction preset of GPU workers (docs/build.md, "GPU workers")
# Runner v2, and one SDK container per worker: one model per GPU.
EXPERIMENTS = ("use_runner_v2", "no_use_multiple_sdk_containers")
FLEX_SETUP_FILE = "/opt/delf/setup.py"  # where flex_template/Dockerfile's launcher finds setup.py
NIGHTLY_MAX_WORKERS = 20  # a nightly run extracts the day's new and changed images only
JOB_LABELS = {"app": "delf-reindex"}  # the Flex Template job's labels


@dataclasses.dataclass(frozen=True)
class DataflowSettings:
    """Where and on what a job runs: the project, region and staging bucket, the worker image, the
    GPU and machine of the extraction workers, the autoscaling limit, and the ``setup.py`` whose sdist
    workers install."""

    project: str
    bucket: str
    image: str
    region: str = "us-central1"
    gpu_type: str = "nvidia-tesla-t4"
    gpu_count: int = 1
    machine_type: str = "n1-standard-8"
    max_workers: int = 50
    setup_file: str = os.path.join(REPO_ROOT, "setup.py")

    @property
    def accelerator(self) -> str:
        """The Beam accelerator hint, in the form of Dataflow's right fitting
        (``type:...;count:...;machine_type:...;install-nvidia-driver``)."""
        return f"type:{self.gpu_type};count:{self.gpu_count};machine_type:{self.machine_type};install-nvidia-driver"

    @property
    def temp_location(self) -> str:
        return f"gs://{self.bucket}/tmp"

    @property
    def staging_location(self) -> str:
        return f"gs://{self.bucket}/staging"

    def beam_options(self) -> list[str]:
        """The Beam pipeline options of every job."""
        options = ["--runner", "DataflowRunner", "--project", self.project, "--region", self.region,
                   "--temp_location", self.temp_location, "--staging_location", self.staging_location,
                   "--setup_file", self.setup_file, "--sdk_container_image", self.image,
                   "--machine_type", self.machine_type, "--max_num_workers", str(self.max_workers)]
        for experiment in EXPERIMENTS:
            options += ["--experiments", experiment]
        return options

    def job_options(self, job: str = "build") -> list[str]:
        """The job's own options: the accelerator hint, and for a build the GPU preset (a search
        extracts with the index's own settings)."""
        return ["--accelerator", self.accelerator] + (["--preset", GPU_PRESET] if job == "build" else [])

    def flex_parameters(self, input: str, index: str) -> dict:
        """The Flex Template parameters (flex_template/metadata.json) of a nightly run."""
        flags = self.job_options("build")  # --name value pairs, as parameters named name
        return {"input": input, "index": index, **dict(zip((f[2:] for f in flags[::2]), flags[1::2]))}

    def flex_environment(self, service_account: str) -> dict:
        """The launch request's runtime environment: the Beam options of :meth:`beam_options` in the
        Flex Template's field names (the launcher passes the setup file itself, ``FLEX_SETUP_FILE``)."""
        return {"serviceAccountEmail": service_account, "maxWorkers": self.max_workers,
                "machineType": self.machine_type, "tempLocation": self.temp_location,
                "stagingLocation": self.staging_location, "sdkContainerImage": self.image,
                "additionalExperiments": list(EXPERIMENTS), "additionalUserLabels": dict(JOB_LABELS)}

    @property
    def flex_launch_url(self) -> str:
        return (f"https://dataflow.googleapis.com/v1b3/projects/{self.project}/locations/{self.region}"
                "/flexTemplates:launch")

    def flex_launch_request(self, job_name: str, template_spec: str, input: str, index: str,
                            service_account: str) -> dict:
        """The body of a ``flexTemplates:launch`` request for one nightly run."""
        return {"launchParameter": {"jobName": job_name, "containerSpecGcsPath": template_spec,
                                    "parameters": self.flex_parameters(input, index),
                                    "environment": self.flex_environment(service_account)}}


# How the Flex Template launcher turns a launch request's environment into the pipeline file's
# options (as Google documents the FlexTemplateRuntimeEnvironment fields); the tests translate the
# nightly job from the argv this gives, so a field the launch request forgets is a difference there.
LAUNCHER_OPTIONS = {"tempLocation": "temp_location", "stagingLocation": "staging_location",
                    "sdkContainerImage": "sdk_container_image", "maxWorkers": "max_num_workers",
                    "machineType": "machine_type", "serviceAccountEmail": "service_account_email"}


def flex_launcher_argv(request: dict, project: str, region: str, setup_file: str = FLEX_SETUP_FILE) -> list[str]:
    """The argv the Flex Template launcher gives ``pipeline/reindex.py`` for a launch request: each
    parameter as ``--name=value``, then the runner, project, region, job name, the setup file of the
    template image and the runtime environment's options."""
    launch = request["launchParameter"]
    environment = launch["environment"]
    argv = [f"--{name}={value}" for name, value in launch["parameters"].items()]
    argv += ["--runner=DataflowRunner", f"--project={project}", f"--region={region}",
             f"--job_name={launch['jobName']}", f"--setup_file={setup_file}"]
    argv += [f"--{option}={environment[field]}" for field, option in LAUNCHER_OPTIONS.items() if field in environment]
    argv += [f"--experiments={e}" for e in environment.get("additionalExperiments", [])]
    argv += [f"--labels={k}={v}" for k, v in environment.get("additionalUserLabels", {}).items()]
    return argv


def add_settings_arguments(parser: argparse.ArgumentParser, max_workers: int = DataflowSettings.max_workers) -> None:
    """The settings as flags, defaulting to the environment variables the launch scripts document."""
    defaults = {f.name: f.default for f in dataclasses.fields(DataflowSettings)}
    env = os.environ.get
    g = parser.add_argument_group("Dataflow settings")
    g.add_argument("--project", default=env("GCP_PROJECT"), help="GCP project (env GCP_PROJECT)")
    g.add_argument("--bucket", default=env("GCS_BUCKET"), help="staging and temp bucket (env GCS_BUCKET)")
    g.add_argument("--image", default=env("WORKER_IMAGE"), help="worker container image (env WORKER_IMAGE)")
    g.add_argument("--region", default=env("GCP_REGION", defaults["region"]),
                   help="Dataflow region (env GCP_REGION, default %(default)s)")
    g.add_argument("--gpu-type", default=env("GPU_TYPE", defaults["gpu_type"]),
                   help="GPU of the extraction workers (env GPU_TYPE, default %(default)s)")
    g.add_argument("--gpu-count", type=int, default=int(env("GPU_COUNT", defaults["gpu_count"])),
                   help="GPUs per extraction worker (env GPU_COUNT, default %(default)s)")
    g.add_argument("--machine-type", default=env("MACHINE_TYPE", defaults["machine_type"]),
                   help="worker machine (env MACHINE_TYPE, default %(default)s)")
    g.add_argument("--max-workers", type=int, default=int(env("MAX_WORKERS", max_workers)),
                   help="autoscaling limit (env MAX_WORKERS, default %(default)s)")


def settings_from_args(args: argparse.Namespace, setup_file: str = DataflowSettings.setup_file) -> DataflowSettings:
    return DataflowSettings(project=args.project, bucket=args.bucket, image=args.image, region=args.region,
                            gpu_type=args.gpu_type, gpu_count=args.gpu_count, machine_type=args.machine_type,
                            max_workers=args.max_workers, setup_file=setup_file)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m pipeline.dataflow", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    options = commands.add_parser("options", help="the Beam and job options of a job, one a line")
    add_settings_arguments(options)
    options.add_argument("--job", choices=("build", "search"), default="build",
                         help="build: pipeline.run or pipeline.reindex; search: pipeline.search (default %(default)s)")
    flex = commands.add_parser("flex-launch", help="the body of the nightly job's flexTemplates:launch request")
    add_settings_arguments(flex, max_workers=NIGHTLY_MAX_WORKERS)
    for name in ("--input", "--index", "--job-name", "--template-spec", "--service-account"):
        flex.add_argument(name, required=True)
    args = parser.parse_args(argv)
    missing = [f"--{name}" for name in ("project", "bucket", "image") if not getattr(args, name)]
    if missing:
        parser.error(f"missing: {' '.join(missing)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.command == "options":
        settings = settings_from_args(args)
        print("\n".join(settings.beam_options() + settings.job_options(args.job)))
    else:
        settings = settings_from_args(args, setup_file=FLEX_SETUP_FILE)
        print(settings.region)
        print(settings.flex_launch_url)
        print(json.dumps(settings.flex_launch_request(args.job_name, args.template_spec, args.input, args.index,
                                                      args.service_account)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
