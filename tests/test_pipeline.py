"""The Beam index build end to end on the local runner: search finds the same scene, nothing is lost,
gs:// works through the emulator, worker processes work, re-runs are idempotent, a fixed
quantizer is reused, http(s) listings are fetched."""

import json
import os
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from delf_retrieval import storage
from delf_retrieval.corpus import inputs
from delf_retrieval.corpus.images import load_image
from delf_retrieval.extraction.extractor import Extractor
from delf_retrieval.index import layout, segment_reader, segments
from delf_retrieval.model import delf
from pipeline import run as run_job
from tests.conftest import FAST, SAMPLES, sample_path, serving
from tests.job_graph import encoding_waits_for_extraction

SCENES = tuple(sorted(s for s in os.listdir(SAMPLES) if os.path.isdir(os.path.join(SAMPLES, s))))[:3]


def small_corpus(folder, per_scene=3):
    """A few photographs of three scenes, kept in scene folders."""
    for scene in SCENES:
        os.makedirs(folder / scene, exist_ok=True)
        for name in sorted(os.listdir(os.path.join(SAMPLES, scene)))[:per_scene]:
            shutil.copy(os.path.join(SAMPLES, scene, name), folder / scene / name)
    return folder


def build(argv, test_pipeline=None):
    assert run_job.run(argv, test_pipeline=test_pipeline) == 0


def votes_for(index_dir, image_path, k=10):
    """Votes per indexed image for the query's descriptors (k neighbours each), as {uri: votes}."""
    reader = segment_reader.open_reader(str(index_dir))
    model, extraction = reader.manifest["model"]["network"], reader.manifest["model"]["extraction"]
    net = delf.load(delf.ModelConfig.from_json(model))
    from delf_retrieval.extraction.extractor import ExtractionConfig

    features = Extractor(net, ExtractionConfig.from_json(extraction)).extract(load_image(image_path))
    _, ids = reader.search(reader.pca.transform(features.descriptors), k, nprobe=16)
    image_ids = reader.rows(ids).image_ids.ravel()
    uri_of = dict(zip(reader.images.column("image_id").to_pylist(), reader.images.column("uri").to_pylist()))
    counted = np.unique(image_ids[image_ids >= 0], return_counts=True)
    return {uri_of[i]: int(n) for i, n in zip(*counted)}


@pytest.fixture(scope="module")
def sample_index(tmp_path_factory, cache_dir):
    """The README's default job over the bundled sample, with cheaper extraction settings."""
    output = tmp_path_factory.mktemp("sample-index")
    build(["--output", str(output)] + FAST)
    return output


def test_sample_index_search_finds_the_same_scene_first(sample_index):
    manifest = segments.verify(str(sample_index))
    images = segment_reader.open_reader(str(sample_index)).images.to_pylist()
    assert manifest["counts"]["inputs"] == manifest["counts"]["images"] == 42 == len(images)
    assert {r["label"] for r in images} == set(os.listdir(SAMPLES)) - {"NOTICE"}  # labels from folders
    query = sample_path("berlin_cathedral", "01.jpg")
    votes = votes_for(sample_index, query)
    ranked = sorted(votes, key=votes.get, reverse=True)
    assert ranked[0].endswith("berlin_cathedral/01.jpg")  # the image itself
    others = [uri for uri in ranked[1:] if "berlin_cathedral" in uri]
    assert ranked[1] in others, ranked[:5]  # then another view of the same building


def test_bad_inputs_are_dead_letters_and_good_ones_indexed(tmp_path, cache_dir):
    corpus = small_corpus(tmp_path / "corpus", per_scene=2)
    (corpus / "empty.jpg").write_bytes(b"")
    (corpus / "junk.jpg").write_bytes(b"not an image" * 100)
    good = open(sample_path("berlin_cathedral", "01.jpg"), "rb").read()
    (corpus / "truncated.jpg").write_bytes(good[: len(good) // 3])
    from PIL import Image

    Image.new("RGB", (40, 10)).save(corpus / "tiny.png")  # shorter side under the 16 px minimum
    output = tmp_path / "index"
    build(["--input", str(corpus), "--output", str(output)] + FAST)
    manifest = segments.verify(str(output))
    dead = pq.read_table(os.path.join(output, manifest["files"]["dead_letters"]["path"])).to_pylist()
    reasons = {os.path.basename(d["uri"]): (d["stage"], d["reason"]) for d in dead}
    assert reasons == {"empty.jpg": ("decode", "empty"), "junk.jpg": ("decode", "corrupt"),
                       "truncated.jpg": ("decode", "truncated"), "tiny.png": ("decode", "too_small")}
    assert all(d["error"] for d in dead)
    images = segment_reader.open_reader(str(output)).images.column("uri").to_pylist()
    assert sorted(os.path.relpath(u, corpus) for u in images) == sorted(
        os.path.join(s, n) for s in SCENES for n in sorted(os.listdir(os.path.join(SAMPLES, s)))[:2])
    assert manifest["counts"]["inputs"] == 10 and manifest["counts"]["rejected"] == 4


def test_rerun_is_idempotent_and_republishes(tmp_path, cache_dir):
    corpus = small_corpus(tmp_path / "corpus", per_scene=2)
    output = tmp_path / "index"
    build(["--input", str(corpus), "--output", str(output)] + FAST)
    first = layout.read_manifest(str(output))
    first_rows = segment_reader.open_reader(str(output))
    build(["--input", str(corpus), "--output", str(output)] + FAST)
    second = layout.read_manifest(str(output))
    assert first["build"] != second["build"] and first["counts"] == second["counts"]
    second_rows = segment_reader.open_reader(str(output))
    a, b = first_rows.rows(np.arange(first_rows.num_rows)), second_rows.rows(np.arange(second_rows.num_rows))
    np.testing.assert_array_equal(a.image_ids, b.image_ids)
    np.testing.assert_array_equal(a.locations, b.locations)
    assert first_rows.images.equals(second_rows.images)
    # A third run keeping one old version removes the first build and keeps the one before it,
    # for readers still on it (the default keeps two, as pipeline.reindex).
    build(["--input", str(corpus), "--output", str(output), "--keep", "1"] + FAST)
    third = layout.read_manifest(str(output))
    assert sorted(os.listdir(output / "builds")) == sorted(b.split("/")[1] for b in (second["build"], third["build"]))


class GraphBuilt(Exception):
    pass


def graph_of(argv, job=None):
    """The Beam graph a build command (``job``: pipeline.run's or pipeline.reindex's ``run``) makes
    for these arguments, stopped before it runs (the run fails and publishes nothing)."""
    import apache_beam as beam

    class GraphOnly(beam.Pipeline):
        def run(self, test_runner_api="AUTO"):
            raise GraphBuilt

    pipeline = GraphOnly()
    with pytest.raises(GraphBuilt):
        (job or run_job.run)(argv, test_pipeline=pipeline)
    return pipeline


def test_encoding_streams_behind_extraction_in_a_training_build_and_with_a_fixed_quantizer(tmp_path):
    quantizer = tmp_path / "quantizer"
    quantizer.mkdir()
    for name in ("pca.npz", "quantizer.npz"):
        (quantizer / name).write_bytes(b"read by the workers, not here")
    trained = graph_of(["--output", str(tmp_path / "a")] + FAST)
    fixed = graph_of(["--output", str(tmp_path / "b"), "--quantizer", str(quantizer)] + FAST)
    assert not encoding_waits_for_extraction(trained)  # the model depends on the training sample alone
    assert not encoding_waits_for_extraction(fixed)


def test_a_training_build_trains_on_a_hashed_sample_and_streams_the_rest(tmp_path, cache_dir):
    from delf_retrieval.build import encode

    corpus = small_corpus(tmp_path / "corpus")  # 9 images
    output = tmp_path / "index"
    # 600 descriptors at 300 per image, twice over: 4 of the 9 images are the training sample.
    assert encode.training_images(600, 300) == 4
    build(["--input", str(corpus), "--output", str(output), "--sample-size", "600"] + FAST)
    manifest = segments.verify(str(output))
    reader = segment_reader.open_reader(str(output))
    uris = reader.images.column("uri").to_pylist()
    assert manifest["counts"]["images"] == 9 == len(uris)  # the sample and the rest, in one index
    assert manifest["training"]["sample_size"] == 600  # a reservoir of the 4 sample images' descriptors
    chosen = encode.training_sample(uris, 600, 300)
    assert len(chosen) == 4
    assert manifest["counts"]["descriptors"] == sum(reader.images.column("num_features").to_pylist())
    votes = votes_for(output, sample_path("berlin_cathedral", "01.jpg"))
    assert max(votes, key=votes.get).endswith("berlin_cathedral/01.jpg")


def test_training_sample_is_chosen_by_hash_of_the_uri():
    import apache_beam as beam
    from apache_beam.testing.util import assert_that, equal_to

    from delf_retrieval.build import encode
    from transforms.extract import split_training_sample

    uris = [f"gs://b/photos/{i}.jpg" for i in range(20_000)]
    chosen = encode.training_sample(uris, 100_000, 1000)  # 200 images of 20,000
    assert len(chosen) == 200 == encode.training_images(100_000, 1000)
    assert chosen == encode.training_sample(reversed(uris), 100_000, 1000)  # whatever the listing's order
    assert chosen == set(sorted(map(inputs.image_id, uris))[:200])
    assert len(encode.training_sample(uris[:50], 100_000, 1000)) == 50  # a small corpus is all sample
    assert encode.expected_descriptors(1000, 312.5) == 312_500 and encode.expected_descriptors(10, float("nan")) is None
    records = [{"uri": u} for u in uris[:500]]  # plan rows
    expected = encode.training_sample(uris[:500], 10_000, 1000)  # 20 images
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    with beam.Pipeline(runner=FnApiRunner()) as p:
        sample, rest = split_training_sample(p | beam.Create(records), frozenset(expected))
        assert_that(sample | "SampleIds" >> beam.Map(lambda r: inputs.image_id(r["uri"])), equal_to(sorted(expected)),
                    label="sample")
        assert_that(rest | beam.combiners.Count.Globally(), equal_to([480]), label="rest")


def test_fixed_quantizer_is_reused(tmp_path, cache_dir, sample_index):
    reader = segment_reader.open_reader(str(sample_index))
    fixed = tmp_path / "quantizer"
    fixed.mkdir()
    for name in ("pca.npz", "quantizer.npz"):
        shutil.copy(os.path.join(sample_index, reader.manifest["codebooks"][name.split(".")[0]]["path"]), fixed / name)
    corpus = small_corpus(tmp_path / "corpus", per_scene=1)
    output = tmp_path / "index"
    # Shards are sized from the bound 3 images x 300 features: ceil(900 / 200) = 5 cell ranges.
    build(["--input", str(corpus), "--output", str(output), "--quantizer", str(fixed), "--rows-per-shard", "200"]
          + FAST)
    manifest = layout.read_manifest(str(output))
    assert manifest["codebooks"]["quantizer"]["sha256"] == reader.manifest["codebooks"]["quantizer"]["sha256"]
    assert manifest["counts"]["images"] == 3
    written = segments.posting_shards(str(output), manifest)
    assert 1 < len(written) <= 5
    assert sum(s["rows"] for s in written) == manifest["counts"]["descriptors"] > 0
    built = segment_reader.open_reader(str(output))
    assert built.quantizer.coarse.n_cells == reader.quantizer.coarse.n_cells
    assert set(built.rows(np.arange(manifest["counts"]["descriptors"])).image_ids.tolist()) == set(
        built.images.column("image_id").to_pylist())


def test_csv_listing_over_http_with_a_failing_url(tmp_path, cache_dir):
    corpus = small_corpus(tmp_path / "corpus", per_scene=1)
    with serving(str(corpus)) as (base, _):
        rows = ["id,url,landmark_id"] + [f"{i},{base}/{s}/{sorted(os.listdir(corpus / s))[0]},{100 + i}"
                                        for i, s in enumerate(SCENES)] + [f"9,{base}/missing.jpg,7"]
        listing = tmp_path / "train.csv"
        listing.write_text("\n".join(rows) + "\n")
        output = tmp_path / "index"
        build(["--input", str(listing), "--output", str(output), "--fetch-retries", "1"] + FAST)
    manifest = layout.read_manifest(str(output))
    dead = pq.read_table(os.path.join(output, manifest["files"]["dead_letters"]["path"])).to_pylist()
    assert [(d["uri"].rsplit("/", 1)[-1], d["stage"], d["reason"]) for d in dead] == [("missing.jpg", "fetch", "fetch_failed")]
    assert "HTTP 404" in dead[0]["error"]
    images = segment_reader.open_reader(str(output)).images.to_pylist()
    assert sorted(r["label"] for r in images) == ["100", "101", "102"]
    assert all(r["image_id"] == inputs.image_id(r["uri"]) for r in images)


def test_gcs_input_and_output_in_worker_processes(tmp_path, cache_dir, gcs_emulator):
    corpus = small_corpus(tmp_path / "corpus", per_scene=1)
    for scene in SCENES:
        for name in os.listdir(corpus / scene):
            storage.upload(str(corpus / scene / name), f"{gcs_emulator}/corpus/{scene}/{name}")
    storage.write_bytes(f"{gcs_emulator}/corpus/broken.jpg", b"\xff\xd8 broken")
    output = f"{gcs_emulator}/indexes/multi"
    build(["--input", f"{gcs_emulator}/corpus/**/*.jpg", "--output", output, "--direct_running_mode=multi_processing",
           "--direct_num_workers=2"] + FAST)
    manifest = segments.verify(output)
    assert manifest["counts"]["images"] == 3 and manifest["counts"]["rejected"] == 1
    reader = segment_reader.open_reader(output)
    assert all(uri.startswith(f"{gcs_emulator}/corpus/") for uri in reader.images.column("uri").to_pylist())
    assert json.loads(storage.read_bytes(f"{output}/manifest.json"))["index_id"] == manifest["index_id"]


def test_landmarks_dev_index_ranks_the_same_scene_first(tmp_path, cache_dir, landmarks_dev):
    output = tmp_path / "index"
    build(["--input", os.path.join(landmarks_dev, "images"), "--output", str(output), "--label-from-folder"] + FAST)
    reader = segment_reader.open_reader(str(output))
    label_of = dict(zip(reader.images.column("uri").to_pylist(), reader.images.column("label").to_pylist()))
    scenes = sorted(set(label_of.values()))
    hits = 0
    for scene in scenes:
        query = sorted(u for u, label in label_of.items() if label == scene)[0]
        votes = votes_for(output, query)
        votes.pop(query)
        best = max(votes, key=votes.get)
        hits += label_of[best] == scene
    # Votes alone (no verification yet) put another view of the same scene first for most scenes.
    assert hits >= 0.8 * len(scenes), f"{hits}/{len(scenes)}"


def test_stage_timings_are_beam_metrics(tmp_path, cache_dir):
    """Each stage records its time per element as a ``delf/<stage>_us`` distribution, one update per
    element it handled, readable from the job's metrics (and shown in the Dataflow UI)."""
    from transforms.extract import STAGES

    corpus = small_corpus(tmp_path / "corpus", per_scene=1)
    (corpus / "junk.jpg").write_bytes(b"not an image" * 100)
    output = tmp_path / "index"
    import apache_beam as beam
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    results = []

    class Kept(beam.Pipeline):  # keeps the run's result, for its metrics
        def run(self, test_runner_api="AUTO"):
            results.append(super().run(test_runner_api))
            return results[-1]

    pipeline = Kept(runner=FnApiRunner())
    build(["--input", str(corpus), "--output", str(output)] + FAST, test_pipeline=pipeline)
    result = results[0]
    distributions = {r.key.metric.name: r.committed for r in result.metrics().query()["distributions"]
                     if r.key.metric.namespace == "delf"}
    assert set(distributions) == {f"{s}_us" for s in STAGES if s != "merge"}  # no merges in a first build
    counts = {name[:-3]: d.count for name, d in distributions.items()}
    shards_written = len(segments.posting_shards(str(output), layout.read_manifest(str(output))))
    assert counts == {"read": 4, "decode": 4, "model_load": 1, "extract": 3, "sample": 3, "train": 1,
                      "encode": 3, "write": shards_written, "first_stage": 1,  # one part of three images
                      "publish": 1, "neighbours": 3}  # each indexed image
    assert all(d.min >= 0 for d in distributions.values())
    assert distributions["extract_us"].sum > distributions["decode_us"].sum > 0  # the network dominates
