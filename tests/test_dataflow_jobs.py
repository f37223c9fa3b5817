"""Each production Dataflow job translated offline, as DataflowRunner would submit it (tests/dataflow_jobs.py):
the accelerator hint sits on the steps from reading an image to its codes and nowhere else, the worker
image is the one given, every stage is there by name, extraction streams into encoding with nothing
that forces a materialisation between them, and nothing refers to a path of the launching machine. The
sdist the jobs stage installs into a fresh venv, where every object the jobs pickle unpickles. The
launchers and the translation take their options from one list (pipeline/dataflow.py)."""

import base64
import json
import os
import re
import subprocess
import sys
import sysconfig
import tarfile
import tempfile

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.portability.api import beam_runner_api_pb2

from pipeline import dataflow
from tests import dataflow_jobs
from tests.conftest import REPO_ROOT
from tests.job_graph import ACCELERATOR, GROUP_BY_KEY, JobGraph, encoding_waits_for_extraction, pickle_strings
from tests.load_pickles import load

JOBS = ("full build", "fixed-quantizer build", "nightly re-index", "batch search")
BUILD_STEPS = {"Plan", "ReadPlan", "SpreadPlan", "New", "AsInputs", "Maybe", "CheckContent", "ToExtract",
               "ExtractImages", "Encode", "ListedAgain", "DeadLetters", "NewImages", "AllRows", "GroupByShard",
               "WriteShards", "NoMerges", "Once", "WriteVersion", "Publish",
               # the first stage's files of every new segment, and the neighbour stage's batches
               "FirstStageOnce", "FirstStageShards", "SpreadFirstStageShards", "FirstStagePartRows",
               "GroupFirstStageParts", "WriteFirstStageParts", "BatchImageRows"}
# Every step of each job's graph, by name (the first level under BuildIndex or SearchQueries).
STEPS = {
    "full build": BUILD_STEPS | {"TrainingSampleImages", "TrainingSampleRest", "SpreadTrainingSample", "SampleInputs",
                                 "ExtractTrainingSample", "TrainingPerImage", "TrainingMeanPerImage",
                                 "TrainingDescriptors", "TrainingReservoir", "Train", "EncodeTrainingSample", "NoDrift",
                                 "DescriptorBound", "AllImageRows", "SpreadImageRows", "FindNeighbours"},
    # Every build keeps the neighbour table by default (--verified-neighbours 0: "NoNeighbours" instead).
    "fixed-quantizer build": BUILD_STEPS | {"GivenModel", "Descriptors", "Sample", "Drift", "DescriptorBound",
                                            "AllImageRows", "SpreadImageRows", "FindNeighbours"},
    # Shards sized from the current version's (no DescriptorBound); its neighbour table kept up to date;
    # no rows copied (its segment is referenced) and, with one segment, nothing to merge.
    "nightly re-index": BUILD_STEPS | {"Current", "ReadModel", "Descriptors", "Sample", "Drift", "AllImageRows",
                                       "SpreadImageRows", "FindNeighbours"},
    "batch search": {"Queries", "Spread", "Extract", "Search", "Failed", "Records", "Write"},
}
# The steps that carry the accelerator hint: each extraction and the step its features go to.
BUILD_GPU_STEPS = ("BuildIndex/ExtractImages/", "BuildIndex/Encode/")
GPU_STEPS = {"full build": BUILD_GPU_STEPS + ("BuildIndex/ExtractTrainingSample/", "BuildIndex/EncodeTrainingSample/"),
             "fixed-quantizer build": BUILD_GPU_STEPS, "nightly re-index": BUILD_GPU_STEPS,
             "batch search": ("SearchQueries/Extract/", "SearchQueries/Search")}
# The main extraction (the composite) of each job, and the step its features stream to.
BUILD_EXTRACTION = ("BuildIndex/ExtractImages/", "BuildIndex/Encode/ParDo(EncodeImages)")
EXTRACTION = {"full build": BUILD_EXTRACTION, "fixed-quantizer build": BUILD_EXTRACTION,
              "nightly re-index": BUILD_EXTRACTION, "batch search": ("SearchQueries/Extract/", "SearchQueries/Search")}
LAUNCHER_ONLY_OPTIONS = ("setup_file",)  # read at submission (to build the sdist), by no worker
TEMPLATE_PARAMETERS = {p["name"]: p for p in json.load(open(os.path.join(REPO_ROOT, "flex_template", "metadata.json")))[
    "parameters"]}


@pytest.fixture(scope="module")
def jobs(gcs_emulator, cache_dir):
    return dataflow_jobs.translate_all(f"{gcs_emulator}/dataflow-jobs")


@pytest.fixture(scope="module")
def settings(gcs_emulator):
    return dataflow_jobs.settings(gcs_emulator[len("gs://"):])


@pytest.mark.parametrize("name", JOBS)
def test_the_job_runs_the_given_image_with_the_given_options(jobs, settings, name):
    job = jobs[name]
    images = {beam_runner_api_pb2.DockerPayload.FromString(env.payload).container_image
              for env in job.job.proto_pipeline.components.environments.values()}
    assert images == {settings.image}
    environment = job.description["environment"]
    (pool,) = environment["workerPools"]
    assert {c["containerImage"] for c in pool["sdkHarnessContainerImages"]} == {settings.image}
    assert pool.get("workerHarnessContainerImage", settings.image) == settings.image
    options = environment["sdkPipelineOptions"]["options"]
    assert options["sdk_container_image"] == settings.image and options["project"] == settings.project
    assert pool["machineType"] == settings.machine_type
    assert pool["autoscalingSettings"]["maxNumWorkers"] == settings.max_workers
    assert set(dataflow.EXPERIMENTS) <= set(environment["experiments"])
    # Right fitting (the accelerator hint) and the worker_accelerator service option do not mix.
    assert not environment.get("serviceOptions")
    staged = {p["name"] for p in pool["packages"]}
    assert "workflow.tar.gz" in staged and staged <= set(job.staged)  # the sdist of --setup_file, staged


@pytest.mark.parametrize("name", JOBS)
def test_only_the_extraction_stage_carries_the_accelerator_hint(jobs, settings, name):
    graph = jobs[name].graph
    hinted = {graph.label(t) for t in graph.leaves if graph.hints(t)}
    expected = {graph.label(t) for t in graph.leaves if graph.environment(t)  # Flattens and shuffles have none
                and graph.label(t).startswith(GPU_STEPS[name])}
    assert hinted == expected and hinted
    values = {graph.hints(t)[ACCELERATOR] for t in graph.leaves if graph.hints(t)}
    assert values == {settings.accelerator}
    # Dataflow right fitting's form of the hint, as the template's spec requires it.
    assert all(re.match(r, settings.accelerator) for r in TEMPLATE_PARAMETERS["accelerator"]["regexes"])
    networks = [t for t in graph.leaves if graph.label(t).endswith("/Extract/ParDo(ExtractFeatures)")]
    assert networks and all(graph.hints(t) for t in networks)  # each network step among them


@pytest.mark.parametrize("name", JOBS)
def test_every_stage_of_the_graph_is_there_by_name(jobs, name):
    labels = jobs[name].graph.labels()
    assert {label.split("/")[1] for label in labels} == STEPS[name]
    assert {label.split("/")[0] for label in labels} == {"SearchQueries" if name == "batch search" else "BuildIndex"}


@pytest.mark.parametrize("name", JOBS)
def test_extraction_streams_into_encoding_with_nothing_between_them(jobs, name):
    graph = jobs[name].graph
    extract, consumer = EXTRACTION[name]
    network = graph.find(f"{extract}Extract/ParDo(ExtractFeatures)")
    after = graph.find(consumer)
    between = graph.between(network, after)
    assert not {t for t in between if graph.leaves[t].spec.urn == GROUP_BY_KEY}  # no GroupByKey, no Reshuffle
    assert not {graph.label(t) for t in between if "Reshuffle" in graph.label(t)}
    assert graph.ancestors(graph.side_inputs[after]).isdisjoint(graph.stage_of(network))  # no side input from it
    if name != "batch search":
        assert not encoding_waits_for_extraction(graph.proto)
    # So one stage holds reading, decoding, the network and encoding (one environment: the hint's).
    stage = {graph.label(t) for t in graph.stage_of(network)}
    assert {graph.label(after)} | {f"{extract}{s}" for s in ("Read/ParDo(ReadImage)", "Decode/ParDo(DecodeImage)")} \
        <= stage
    # And extraction is not fused where it must not be: a shuffle spreads the inputs over workers
    # first, and a training sample is extracted in a stage of its own, before the model exists.
    source = "SearchQueries/Queries/Map(decode)" if name == "batch search" else "BuildIndex/ReadPlan"
    assert graph.stage_of(graph.find(source)) != graph.stage_of(network)
    spread = graph.between(graph.find(source), graph.find(f"{extract}Read/ParDo(ReadImage)"))
    assert any(graph.leaves[t].spec.urn == GROUP_BY_KEY for t in spread)
    if name == "full build":
        sample = graph.find("BuildIndex/ExtractTrainingSample/Extract/ParDo(ExtractFeatures)")
        assert graph.stage_of(sample) != graph.stage_of(network)
        assert graph.find("BuildIndex/EncodeTrainingSample/ParDo(EncodeImages)") not in graph.stage_of(sample)


def local_prefixes() -> tuple[str, ...]:
    """Where paths of the launching machine start: the checkout, the interpreter's environment, the
    home and working folders, the temporary folder."""
    found = {REPO_ROOT, os.path.realpath(REPO_ROOT), sys.prefix, os.path.expanduser("~"), os.getcwd(),
             tempfile.gettempdir()}
    return tuple(sorted(p.rstrip("/") + "/" for p in found if p and p != "/"))


def strings_of_json(value, where=""):
    if isinstance(value, dict):
        for key, item in value.items():
            yield from strings_of_json(item, f"{where}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from strings_of_json(item, f"{where}[{i}]")
    elif isinstance(value, str):
        yield where, value


def strings_of_proto(proto: beam_runner_api_pb2.Pipeline):
    """The texts of the pipeline proto outside its pickles: names, display data, environments (images
    and the artifacts workers fetch)."""
    for t in proto.components.transforms.values():
        yield f"step {t.unique_name}", t.unique_name
        for item in t.display_data:
            payload = beam_runner_api_pb2.LabelledPayload.FromString(item.payload)
            yield f"step {t.unique_name} display data {payload.label}", payload.string_value
    for eid, env in proto.components.environments.items():
        yield f"environment {eid}", beam_runner_api_pb2.DockerPayload.FromString(env.payload).container_image
        for dep in env.dependencies:
            kind = (beam_runner_api_pb2.ArtifactUrlPayload if dep.type_urn.endswith(":url:v1")
                    else beam_runner_api_pb2.ArtifactFilePayload)
            payload = kind.FromString(dep.type_payload)
            yield f"environment {eid} artifact", getattr(payload, "url", "") or getattr(payload, "path", "")


@pytest.mark.parametrize("name", JOBS)
def test_nothing_in_the_job_refers_to_a_path_of_the_launching_machine(jobs, name):
    from delf_retrieval import storage

    job = jobs[name]
    prefixes = local_prefixes()
    found = [(where, text) for where, text in strings_of_json(job.description)
             if text.startswith(prefixes) and not any(f".{o}" in where for o in LAUNCHER_ONLY_OPTIONS)]
    display = job.description["environment"]["sdkPipelineOptions"]["display_data"]
    found = [(w, t) for w, t in found if not any(d.get("key") in LAUNCHER_ONLY_OPTIONS and d.get("value") == t
                                                  for d in display)]
    found += [(where, text) for where, text in strings_of_proto(job.job.proto_pipeline) if text.startswith(prefixes)]
    code_files = set()
    for pickled in job.graph.pickled():
        _, _, files = load(pickled.stream)
        code_files |= files
        found += [(pickled.where, text) for text in pickle_strings(pickled.stream) - files if text.startswith(prefixes)]
    session = storage.read_bytes(job.staged["pickled_main_session"])
    found += [("pickled_main_session", text) for text in pickle_strings(session) if text.startswith(prefixes)]
    assert found == []
    # The file names of code pickled by value (tracebacks name them) are Beam's own lambdas', never ours.
    assert code_files and all(f.startswith(os.path.dirname(beam.__file__) + "/") for f in code_files), code_files


def test_the_staged_sdist_installs_in_a_fresh_venv_and_every_pickled_object_loads_there(jobs, tmp_path):
    """What a worker does: install the sdist the job staged, then unpickle the job's DoFns, CombineFns,
    their arguments and coders, and find the trained head its extraction names. The venv sees the
    project venv's packages (the image's pinned requirements) but not the source tree, so each
    module of ours, and the head, must come from the sdist."""
    from delf_retrieval import storage

    sdist = tmp_path / "workflow.tar.gz"
    sdist.write_bytes(storage.read_bytes(jobs["full build"].staged["workflow.tar.gz"]))
    members = {n.split("/", 1)[1] for n in tarfile.open(sdist).getnames() if "/" in n}
    for other in JOBS[1:]:  # every job stages the same package
        copy = tmp_path / f"{other}.tar.gz"
        copy.write_bytes(storage.read_bytes(jobs[other].staged["workflow.tar.gz"]))
        assert {n.split("/", 1)[1] for n in tarfile.open(copy).getnames() if "/" in n} == members
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # The image's requirements: the project venv's site-packages, without its .pth files (so no
    # editable install of this checkout).
    with open(os.path.join(site, "requirements-of-the-image.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", site, str(sdist)], check=True, capture_output=True)
    records = [{"where": f"{name}: {p.where}", "stream": base64.b64encode(p.stream).decode()}
               for name in JOBS for p in jobs[name].graph.pickled()]
    (tmp_path / "pickles.json").write_text(json.dumps(records))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    result = subprocess.run([str(python), "-I", os.path.join(REPO_ROOT, "tests", "load_pickles.py"),
                             str(tmp_path / "pickles.json")], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["failures"] == []
    ours = {name: path for name, path in report["modules"].items()
            if name.split(".")[0] in ("delf_retrieval", "pipeline", "transforms")}
    assert {"transforms.extract", "transforms.index", "transforms.reindex", "transforms.neighbours",
            "transforms.search", "delf_retrieval.build.planning", "delf_retrieval.corpus.inputs"} <= set(ours)
    assert all(path.startswith(site + "/") for path in ours.values()), ours
    assert {os.path.relpath(path, site) for path in ours.values()} <= members
    # The trained head an extraction names (the lite-gpu preset's) is found in the installed package.
    heads = {load(p.stream)[0][0].model_config.get("attention_weights") for name in JOBS
             for p in jobs[name].graph.pickled() if p.where.endswith("ParDo(ExtractFeatures): do_fn")} - {None}
    assert heads
    probe = "import sys\nfrom delf_retrieval.model import delf\nprint(*map(delf.head_weights_path, sys.argv[1:]))"
    found = subprocess.run([str(python), "-I", "-c", probe, *sorted(heads)], cwd=tmp_path, env=env,
                           capture_output=True, text=True, check=True).stdout.split()
    assert len(found) == len(heads) and all(p.startswith(site + "/") and os.path.isfile(p) for p in found), found


def test_run_dataflow_the_flex_template_and_the_search_pass_the_same_options(settings, tmp_path):
    """The options of run_dataflow.sh's command, of the Flex Template's launch request (as its
    launcher passes them) and of the search are pipeline/dataflow.py's list, the one the translation
    tests use."""
    expected = settings.beam_options() + settings.job_options("build")
    build_argv = dataflow_jobs.run_dataflow_argv(settings, "gs://b/photos", "gs://b/index")
    assert build_argv == ["--input", "gs://b/photos", "--output", "gs://b/index"] + expected
    request = dataflow_jobs.flex_launch_request(settings, "gs://b/photos", "gs://b/index")
    flex = dataflow.flex_launcher_argv(request, settings.project, settings.region, settings.setup_file)

    def beam_view(argv):
        return {k: v for k, v in PipelineOptions(argv).get_all_options(drop_default=True).items()
                if k not in ("job_name", "service_account_email", "labels")}

    assert beam_view(flex) == beam_view(settings.beam_options())
    from pipeline import reindex

    args, _ = reindex.parse_args(flex)
    assert (args.accelerator, args.preset) == (settings.accelerator, dataflow.GPU_PRESET)
    for name, value in request["launchParameter"]["parameters"].items():  # as the template's spec accepts them
        assert all(re.match(r, value) for r in TEMPLATE_PARAMETERS[name].get("regexes", [])), name
    assert dataflow_jobs.search_options(settings) == settings.beam_options() + settings.job_options("search")
    dockerfile = open(os.path.join(REPO_ROOT, "flex_template", "Dockerfile")).read()
    assert f"FLEX_TEMPLATE_PYTHON_SETUP_FILE={dataflow.FLEX_SETUP_FILE}" in dockerfile


def test_job_graph_cuts_stages_where_a_runner_must():
    """The stage model the tests above rely on, on small graphs with known answers: a GroupByKey, a
    change of environment (a step with its own resource hints) and a side input computed in the same
    stage each cut a stage; a Flatten does not."""
    pipeline = beam.Pipeline()
    a = pipeline | "A" >> beam.Create([1, 2]) | "B" >> beam.Map(lambda x: x)
    c = a | "C" >> beam.Map(lambda x: x).with_resource_hints(accelerator="type:nvidia-tesla-t4;count:1")
    d = c | "D" >> beam.Map(lambda x: x)
    e = (a, d) | "E" >> beam.Flatten() | "F" >> beam.Map(lambda x: x)
    total = a | "Total" >> beam.combiners.Count.Globally()
    _ = a | "G" >> beam.Map(lambda x, n: x, n=beam.pvalue.AsSingleton(total))
    _ = e | "H" >> beam.Reshuffle() | "I" >> beam.Map(lambda x: x)
    graph = JobGraph.of(pipeline)
    stage = lambda label: {graph.label(t) for t in graph.stage_of(graph.find(label))}  # noqa: E731
    assert stage("B") >= {"A/Map(decode)", "B"} and "C" not in stage("B")  # the hint's environment
    assert stage("C") == {"C"} and "D" in stage("F")  # through the Flatten, in one environment
    assert "F" not in stage("B")  # F also needs D, which needs C: B's stage would have to wait for itself
    assert "G" not in stage("B")  # its side input is computed from B's stage
    assert "I" not in stage("F") and "H/RemoveRandomKeys" in stage("I")  # the Reshuffle's GroupByKey
    assert graph.hints(graph.find("C")) and not graph.hints(graph.find("D"))
