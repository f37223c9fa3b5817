"""The one index build as a Beam graph, in each of its modes (``delf_retrieval.build.planning``): read the
plan, check and extract the inputs, train (or load) PCA + quantizer, encode each image, carry the
rows of unchanged images over, write one Parquet shard per range of cells, then the tables, the
manifest and the pointer, last. Every numerical step is a call into ``delf_retrieval``."""

from __future__ import annotations

import json
import time

import apache_beam as beam
from apache_beam.metrics import Metrics

from delf_retrieval import storage
from delf_retrieval.build import encode
from delf_retrieval.build import planning as plan_lib
from delf_retrieval.build.encode import PublishRefused, Reservoir, expected_descriptors
from delf_retrieval.corpus import inputs
from delf_retrieval.index import layout, merging, scrub, segments, shards, versions
from delf_retrieval.index.neighbour_table import NEIGHBOURS_FILE
from delf_retrieval.index.segments import codebook_records
from transforms.extract import DEAD_LETTER, StageTimer, internal_error, split_training_sample, with_accelerator
from transforms.first_stage import first_stage_entry, first_stage_files
from transforms.neighbours import FindNeighbours, StoredImageRows, image_rows, next_neighbour_table, stored_shards
from transforms.reindex import SAME, CarryPostings, CheckContent, drift_error, read_current_model

IMAGES = "images"
IMAGE_ROWS = "image_rows"  # (image id, PostingRows) of each encoded image, for the neighbour stage


class ReservoirFn(beam.CombineFn):
    """A uniform sample of at most ``max_rows`` descriptors over all images, merged across workers."""

    def __init__(self, max_rows: int, seed: int = 0):
        self.max_rows = max_rows
        self.seed = seed
        self.timing = StageTimer("sample")

    def create_accumulator(self):
        return Reservoir(self.max_rows, self.seed)

    def add_input(self, reservoir, descriptors):
        with self.timing:
            reservoir.add(descriptors)
        return reservoir

    def merge_accumulators(self, reservoirs):
        reservoirs = list(reservoirs)
        merged = reservoirs[0]
        for other in reservoirs[1:]:
            merged.merge(other)
        return merged

    def extract_output(self, reservoir):
        return reservoir.result() if reservoir.seen else None


def train_model(sample, config: plan_lib.BuildConfig, expected_count: int | None):
    """The separate builder's work, as one step: a ``TrainedModel`` from the sample."""

    if sample is None:
        raise encode.PublishRefused("no image produced features: nothing to train the index on")
    with StageTimer("train"):
        return encode.TrainedModel.trained(sample, config.index, config.pca_dim, expected_count)


def train_for(sample, config: plan_lib.BuildConfig, listed: int, per_image: float):
    """``train_model`` with the count expected of ``listed`` images at ``per_image`` descriptors each."""

    return train_model(sample, config, expected_descriptors(listed, per_image))


def feature_count(record) -> int:
    """(key, Features, facts) -> its number of features."""
    return len(record[1])


def descriptors_of(record):
    """(key, Features, facts) -> its descriptors."""
    return record[1].descriptors


def has_action(row: dict, action: str) -> bool:
    return row["action"] == action


def train_on_sample(sample_features, listed: int, config: plan_lib.BuildConfig):
    """The model trained on a reservoir of the training sample's descriptors, its LOPQ regions sized
    for ``listed`` x the sample's mean descriptors per image. It depends on the sample's features
    only, so the other images' extraction fuses with their encoding."""
    per_image = (sample_features | "TrainingPerImage" >> beam.Map(feature_count)
                 | "TrainingMeanPerImage" >> beam.combiners.Mean.Globally())
    return (
        sample_features
        | "TrainingDescriptors" >> beam.Map(descriptors_of)
        | "TrainingReservoir" >> beam.CombineGlobally(ReservoirFn(config.sample_size, config.index.seed))
        | "Train" >> beam.Map(train_for, config, listed, per_image=beam.pvalue.AsSingleton(per_image))
    )


class EncodeImages(beam.DoFn):
    """(InputImage, Features, ImageFacts) -> (shard, PostingRows) per shard the image touches, and an
    image-table record on the ``images`` output. The model (a ``TrainedModel``) arrives as a side
    input and is loaded once per worker. Shards are cut from ``num_shards`` when given, else from
    the ``descriptors`` side input (an upper bound of the total)."""

    def __init__(self, rows_per_shard: int, num_shards: int | None, keep_rows: bool = False):
        self.rows_per_shard = rows_per_shard
        self.num_shards = num_shards
        self.keep_rows = keep_rows  # also each image's rows whole, on ``image_rows``
        self._model_key = None
        self.images = Metrics.counter("delf", "images_indexed")
        self.rows = Metrics.counter("delf", "descriptors_indexed")
        self.timing = StageTimer("encode")

    def process(self, element, model, descriptors=None):
        key, features, facts = element
        try:
            with self.timing:
                if self._model_key != id(model):
                    self.projection, self.quantizer = model.load()
                    self._model_key = id(model)
                n_cells = self.quantizer.coarse.n_cells
                n_shards = self.num_shards or shards.shard_count(descriptors, n_cells, self.rows_per_shard)
                image_id = inputs.image_id(key.uri)
                height, width = features.image_size
                parts, rows = [], None
                if len(features):
                    rows = encode.encode_image(image_id, features, self.projection, self.quantizer)
                    parts = list(encode.split_by_shard(rows, n_cells, n_shards))
        except Exception as e:  # noqa: BLE001 - one image's failure is its dead letter, not the bundle's
            yield internal_error(key.uri, "encode", e)
            return
        self.images.inc()
        self.rows.inc(len(features))
        yield beam.pvalue.TaggedOutput(IMAGES, {"image_id": image_id, "uri": key.uri, "width": int(width),
                                                "height": int(height), "num_features": len(features),
                                                "content_hash": facts.content_hash, "label": key.label,
                                                "latitude": facts.latitude, "longitude": facts.longitude})
        if self.keep_rows and rows is not None:
            yield beam.pvalue.TaggedOutput(IMAGE_ROWS, (image_id, rows))
        yield from parts


def encode_images(features, model, job: plan_lib.BuildJob, descriptors, label: str = "Encode",
                  accelerator: str | None = None):
    """(InputImage, Features, ImageFacts) -> EncodeImages' ``rows`` and ``images`` outputs; with the
    extraction's ``accelerator`` hint, so that it fuses with the extraction (``with_accelerator``)."""
    sizes = {} if job.num_shards else {"descriptors": beam.pvalue.AsSingleton(descriptors)}
    encode = beam.ParDo(EncodeImages(job.config.rows_per_shard, job.num_shards, keep_rows=job.neighbours is not None),
                        model=beam.pvalue.AsSingleton(model), **sizes)
    return features | label >> with_accelerator(encode, accelerator).with_outputs(IMAGES, IMAGE_ROWS, DEAD_LETTER,
                                                                                 main="rows")


def write_shard(element, job: plan_lib.BuildJob, m: int, bits: int) -> dict:
    """One posting shard of the run's new segment; its record's path is relative to the segment's folder."""

    with StageTimer("write"):
        shard, parts = element
        table = shards.postings_table(shards.PostingRows.concatenate(list(parts), m), bits)
        return shards.write_shard(segments.segment_folder(job.root, job.segment_id),
                                  f"{layout.POSTINGS_DIR}/part-{shard:05d}.parquet", table, job.index_id)


def dropped_by_merges(job: plan_lib.BuildJob, tombstones=None, plan: list[dict] | None = None):
    """What the run's merges drop from their sources: the current version's tombstones of those
    segments and the images the plan deletes from them (``segments.Tombstones``); ``tombstones``
    and ``plan`` when the caller has read them already."""

    if tombstones is None:
        tombstones = segments.read_tombstones(job.root, {"files": job.previous_files})
    if plan is None:
        plan = plan_lib.read_plan(job.plan_path, (plan_lib.DELETE,))
    sources = [s for m in job.merges for s in m.source_ids]
    dropped = tombstones.only(sources)
    for row in plan:
        if row["action"] == plan_lib.DELETE and row["segment"] in sources:
            dropped = dropped.adding(row["segment"], [inputs.image_id(row["uri"])])
    return dropped


class MergeShard(beam.DoFn):
    """(merge number, shard) -> (merge number, shard record) of that shard of the merged segment,
    written from the live rows of the merge's sources in its cell range (``merging.merged_shard``)."""

    def __init__(self, job: plan_lib.BuildJob, n_cells: int, m: int, bits: int):
        self.job, self.n_cells, self.m, self.bits = job, n_cells, m, bits
        self.rows = Metrics.counter("delf", "descriptors_merged")

    def setup(self):
        self.dropped = dropped_by_merges(self.job)

    def process(self, element):
        number, shard = element
        merge = self.job.merges[number]
        with StageTimer("merge"):
            table = merging.merged_shard(self.job.root, merge, shard, self.dropped, self.n_cells, self.m, self.bits)
            self.rows.inc(table.num_rows)
            record = shards.write_shard(segments.segment_folder(self.job.root, merge.segment_id),
                                        f"{layout.POSTINGS_DIR}/part-{shard:05d}.parquet", table, merge.index_id)
        yield number, record


class BuildIndex(beam.PTransform):
    """The whole build, from its plan to the published version (``job.mode``):

    - full: every input is extracted; PCA + quantizer are trained on the training sample alone
      (images chosen by hash of the uri, extracted first: a bounded set of features, held until the
      model exists and then encoded);
    - fixed: every input is extracted and encoded with ``model``, a given ``TrainedModel``;
    - incremental: the current version's model (from ``pointer``, the current manifest) is reused,
      the inputs whose change marker changed are read and hashed first (``CheckContent``) and
      extracted only if their bytes changed, and the posting rows of the others are carried over
      from the current shards (``CarryPostings``); the new descriptors' quantization error under
      the codebooks is measured (drift).

    In every mode nothing waits for all images' features: the model depends on the training sample
    or is known up front, and shards are sized up front (``job.num_shards``) or from the inputs to
    read x ``max_features`` (``job.descriptor_bound``), so raw features stream through to their
    codes. ``extract()`` makes the extraction transform (``ExtractImages``) of the run; ``accelerator``
    is the Beam accelerator hint of each extraction and its encoding (None: none)."""

    def __init__(self, job: plan_lib.BuildJob, extract, model=None, pointer: dict | None = None,
                 accelerator: str | None = None):
        super().__init__()
        if job.mode == plan_lib.FIXED and model is None:
            raise ValueError("a fixed-quantizer build needs its model")
        if job.mode == plan_lib.INCREMENTAL and pointer is None:
            raise ValueError("an incremental build needs the current version's manifest")
        self.job, self.extract, self.model, self.pointer = job, extract, model, pointer
        self.accelerator = accelerator

    def expand(self, pbegin):
        job = self.job
        planned = (pbegin | "Plan" >> beam.Create([job.plan_path])
                   | "ReadPlan" >> beam.FlatMap(plan_lib.read_plan, (plan_lib.CHECK, plan_lib.EXTRACT)))
        if job.mode == plan_lib.FULL:
            # The training sample leaves before the spreading, through a Reshuffle of its own: its
            # extraction is then a stage of its own, done before the model, and the other images'
            # extraction fuses with their encoding (one shared Reshuffle would put both extractions
            # in one stage, which would have to finish, holding every image's features, before
            # the model exists).
            sample, planned = split_training_sample(planned, job.training_sample)
            sample = sample | "SpreadTrainingSample" >> beam.Reshuffle() | "SampleInputs" >> beam.Map(plan_lib.input_of)
        todo = planned | "SpreadPlan" >> beam.Reshuffle()
        fresh = (todo | "New" >> beam.Filter(has_action, plan_lib.EXTRACT)
                 | "AsInputs" >> beam.Map(plan_lib.input_of))
        checked = (todo | "Maybe" >> beam.Filter(has_action, plan_lib.CHECK)
                   | "CheckContent" >> beam.ParDo(CheckContent(job.fetch)).with_outputs(DEAD_LETTER, SAME,
                                                                                       main="changed"))
        to_extract = (fresh, checked.changed) | "ToExtract" >> beam.Flatten()
        dead = [pbegin | "ListedAgain" >> beam.Create(list(job.repeats)), checked[DEAD_LETTER]]
        descriptors = None if job.num_shards else pbegin | "DescriptorBound" >> beam.Create([job.descriptor_bound])
        encoded = []
        if job.mode == plan_lib.FULL:
            sample_features = sample | "ExtractTrainingSample" >> with_accelerator(self.extract(), self.accelerator)
            dead.append(sample_features[DEAD_LETTER])
            model = train_on_sample(sample_features["features"], job.listed, job.config)
            encoded.append(encode_images(sample_features["features"], model, job, descriptors,
                                         label="EncodeTrainingSample", accelerator=self.accelerator))
        elif job.mode == plan_lib.FIXED:
            model = pbegin | "GivenModel" >> beam.Create([self.model])
        else:

            current = {"codebooks": codebook_records(self.pointer), "training": self.pointer.get("training")}
            model = (pbegin | "Current" >> beam.Create([None])
                     | "ReadModel" >> beam.Map(read_current_model, job.root, current))
        extracted = to_extract | "ExtractImages" >> with_accelerator(self.extract(), self.accelerator)
        features = extracted["features"]
        if job.mode == plan_lib.FULL:
            new_error = pbegin | "NoDrift" >> beam.Create([None])
        else:  # the codebooks were trained on other images: how well do they fit the new ones?
            new_error = (features | "Descriptors" >> beam.Map(descriptors_of)
                         | "Sample" >> beam.CombineGlobally(ReservoirFn(job.drift_sample, job.config.index.seed))
                         | "Drift" >> beam.Map(drift_error, model=beam.pvalue.AsSingleton(model)))
        encoded.append(encode_images(features, model, job, descriptors, accelerator=self.accelerator))
        dead = (dead + [extracted[DEAD_LETTER]] + [e[DEAD_LETTER] for e in encoded]) | "DeadLetters" >> beam.Flatten()
        new_images = [e[IMAGES] for e in encoded] | "NewImages" >> beam.Flatten()
        rows = [e.rows for e in encoded]
        if job.carry:  # over a format-1 version: the kept images' rows are copied into the new segment
            rows.append(
                pbegin | "CurrentShards" >> beam.Create(self.pointer["shards"]) | "SpreadShards" >> beam.Reshuffle()
                | "Carry" >> beam.ParDo(CarryPostings(job, self.pointer["params"]),
                                        same_uris=beam.pvalue.AsList(checked[SAME])))
        index = job.config.index
        shard_records = (
            rows | "AllRows" >> beam.Flatten() | "GroupByShard" >> beam.GroupByKey()
            | "WriteShards" >> beam.Map(write_shard, job, index.pq_m, index.pq_bits)
        )
        if job.merges:  # the run's merges, one step per shard of each merged segment
            n_cells = int(self.pointer["params"]["n_cells"])
            merged_records = (
                pbegin | "MergeShards" >> beam.Create([(i, s) for i, m in enumerate(job.merges)
                                                       for s in range(m.num_shards)])
                | "SpreadMergeShards" >> beam.Reshuffle()
                | "Merge" >> beam.ParDo(MergeShard(job, n_cells, index.pq_m, index.pq_bits)))
        else:
            merged_records = pbegin | "NoMerges" >> beam.Create([])
        version = (
            pbegin | "Once" >> beam.Create([None])
            | "WriteVersion" >> beam.ParDo(
                WriteVersion(job), model=beam.pvalue.AsSingleton(model),
                shard_records=beam.pvalue.AsList(shard_records), merged_records=beam.pvalue.AsList(merged_records),
                new_images=beam.pvalue.AsList(new_images), same_uris=beam.pvalue.AsList(checked[SAME]),
                dead_letters=beam.pvalue.AsList(dead), new_error=beam.pvalue.AsSingleton(new_error))
        )
        stage_parts = first_stage_files(pbegin, job, version, index.pq_m, index.pq_bits)
        if job.neighbours is not None:  # each new image searches the written version with its own rows
            searching = [e[IMAGE_ROWS] for e in encoded]
            if job.mode == plan_lib.INCREMENTAL and job.previous_neighbours is None:
                # The version gains its table: the kept images search too, with their stored rows.
                searching.append(
                    pbegin | "VersionOnce" >> beam.Create([None])
                    | "StoredShards" >> beam.FlatMap(stored_shards, job, version=beam.pvalue.AsSingleton(version))
                    | "SpreadStoredShards" >> beam.Reshuffle()
                    | "StoredImageRows" >> beam.ParDo(StoredImageRows(job, index.pq_m, index.pq_bits),
                                                      version=beam.pvalue.AsSingleton(version))
                    | "GroupImageRows" >> beam.GroupByKey()
                    | "ImageRows" >> beam.Map(image_rows, index.pq_m))
            edges = (searching | "AllImageRows" >> beam.Flatten()
                     | "SpreadImageRows" >> beam.Reshuffle()
                     | "BatchImageRows" >> beam.BatchElements(min_batch_size=1, max_batch_size=32)
                     | "FindNeighbours" >> beam.ParDo(FindNeighbours(job), version=beam.pvalue.AsSingleton(version),
                                                      first_stage=beam.pvalue.AsList(stage_parts)))
        else:
            edges = pbegin | "NoNeighbours" >> beam.Create([])
        return version | "Publish" >> beam.ParDo(PublishVersion(job), edges=beam.pvalue.AsList(edges),
                                                 first_stage=beam.pvalue.AsList(stage_parts))


CHANGE_COUNTS = ("listed", "added", "changed", "unchanged", "deleted", "rejected", "reused", "re_extracted")


class WriteVersion(beam.DoFn):
    """On one worker, once every shard is written: the run's new segment completed (its image
    table and manifest: the images encoded by this run, with the kept ones' when it carries their
    rows) and each merged one, a training build's codebooks (PCA + quantizer, under
    ``codebooks/``), the dead-letter table into the version folder, and the version's manifest
    (format 2: the codebooks and segments it lists, its tombstones and restamps, the build's
    settings) and run report, handed on, not yet written (``PublishVersion`` does that). Refuses
    (``PublishRefused``) a build that lost inputs, failed to carry rows over, or rejected more than
    ``job.max_rejected_fraction`` of its inputs; its dead-letter table is still written into its
    folder, to be read."""

    def __init__(self, job: plan_lib.BuildJob):
        self.job = job

    def process(self, _, model, shard_records, merged_records, new_images, same_uris, dead_letters, new_error):
        job = self.job
        with StageTimer("publish"):
            plan = plan_lib.read_plan(job.plan_path)
            same = set(same_uris)
            carry_failed = [d for d in dead_letters if d["stage"] == "carry"]
            if carry_failed:
                raise PublishRefused(
                    f"{len(carry_failed)} posting shards of the current version could not be carried over (first: "
                    f"{carry_failed[0]['uri']}: {carry_failed[0]['error']}): not published, the current version "
                    "keeps serving; run with --retrain to rebuild the index from its inputs")
            indexed = job.kept + len(same) + len(new_images)
            refuse_unless_publishable(job, indexed, dead_letters)
            _, quantizer = model.load()
            removed, restamped = self.changes(plan, same)
            written, tombstones, restamps = self.write_segments(plan, same, removed, restamped, shard_records,
                                                                merged_records, new_images)
            files = write_version_files(job, dead_letters)
            codebooks = job.codebooks or segments.write_codebooks(job.root, job.build_id, model.quantizer, model.pca)
            manifest = segments.segmented_manifest(
                storage.join(job.root, job.build), layout.new_index_id(), quantizer, files, list(job.segments) + written,
                tombstones, restamps, version_folder=job.build, model=job.model_info,
                extra={"settings": {"build": job.config.to_json(), "fetch": job.fetch.to_json()},
                       "training": model.training_record()},
                live_descriptors=self.live_descriptors(plan, same, shard_records, new_images), codebooks=codebooks)
            report = self.report(plan, same, indexed, new_images, dead_letters, manifest, new_error, model, written)
            manifest.update({"drift": report["drift"], "changes": {k: report[k] for k in CHANGE_COUNTS}})
            if job.scrub is not None:  # where the next run's scrub goes on, and what this one found
                manifest["scrub"] = job.scrub
            report["repaired"] = list(job.repaired)
            manifest["counts"]["inputs"] = job.listed
            if manifest["counts"]["images"] != indexed:
                raise PublishRefused(f"the new version would hold {manifest['counts']['images']} live images, but "
                                     f"{indexed} were indexed: not published (a bookkeeping error)")
        new_ids = {r["image_id"] for r in new_images}
        yield {"manifest": manifest, "report": report, "searched": sorted(new_ids),
               "removed": sorted({image_id for _, image_id in removed} - new_ids),
               "written": [ref.segment_id for ref in written]}

    def write_segments(self, plan, same, removed, restamped, shard_records, merged_records, new_images):
        """(the segments this run wrote: each merged one, then its own if it encoded any image; the
        new version's tombstones; its restamps). A merged segment's image table takes this run's
        restamps; an image removed from a merged segment is tombstoned there unless the merge
        already dropped it."""

        job = self.job
        previous = {"files": job.previous_files}
        tombstones, restamps = segments.read_tombstones(job.root, previous), segments.read_restamps(job.root, previous)
        removed = [r for r in removed if r[0] is not None]  # those in a segment are tombstoned
        restamped = [r for r in restamped if r[0] is not None]
        written = []
        if job.merges:
            dropped = dropped_by_merges(job, tombstones, plan)
            with_run = restamps
            for segment, image_id, stamp in restamped:
                with_run = with_run.adding(segment, {image_id: stamp})
            for number, merge in enumerate(job.merges):
                written.append(segments.finish_segment(
                    job.root, merge.segment_id, merge.index_id, merging.merged_images(job.root, merge, dropped, with_run),
                    [r for n, r in merged_records if n == number]))
            gone = {(s, int(i)) for s, ids in dropped.deleted.items() for i in ids}
            removed = [r for r in removed if r not in gone]
        images = self.segment_images(plan, new_images, same)
        if images:
            written.append(segments.finish_segment(job.root, job.segment_id, job.index_id, shards.image_table(images),
                                                   shard_records))
        tombstones, restamps = merging.successor(list(job.segments), tombstones, restamps, list(job.merges),
                                                  removed, restamped)
        return written, tombstones, restamps

    def live_descriptors(self, plan, same, shard_records, new_images) -> int:
        """The new version's live rows: those of its one segment when it wrote them all; else the
        current version's, less those of the images it removes, plus the new ones' (merges keep
        every live row)."""
        if self.job.mode != plan_lib.INCREMENTAL or self.job.carry:
            return sum(r["rows"] for r in shard_records)
        lost = sum(row["num_features"] or 0 for row in plan if row["action"] == plan_lib.DELETE
                   or (row["action"] == plan_lib.CHECK and row["uri"] not in same))
        return self.job.previous_descriptors - lost + sum(r["num_features"] for r in new_images)

    def segment_images(self, plan: list[dict], new_images: list[dict], same: set) -> list[dict]:
        """The new segment's image table: the images encoded by this run (with their listed stamp)
        and, when it carries rows over, those whose rows it copied, by uri."""
        stamp = {row["uri"]: row["stamp"] for row in plan}
        images = [{**record, "stamp": stamp[record["uri"]]} for record in new_images]
        if self.job.carry:
            images += [plan_lib.indexed_record(row) for row in plan if row["action"] == plan_lib.KEEP
                       or (row["action"] == plan_lib.CHECK and row["uri"] in same)]
        return sorted(images, key=lambda r: r["uri"])

    @staticmethod
    def changes(plan: list[dict], same: set) -> tuple[list, list]:
        """((segment, image id) of indexed images whose rows must go: deleted, changed or now
        rejected; (segment, image id, stamp) of images touched but unchanged). The segment is None
        for an image of a format-1 version (its rows are copied or dropped, not tombstoned)."""

        removed, restamped = [], []
        for row in plan:
            if row["action"] == plan_lib.DELETE or (row["action"] == plan_lib.CHECK and row["uri"] not in same):
                removed.append((row["segment"], inputs.image_id(row["uri"])))
            elif row["action"] == plan_lib.CHECK:
                restamped.append((row["segment"], inputs.image_id(row["uri"]), row["stamp"]))
        return removed, restamped

    def report(self, plan, same, indexed, new_images, dead_letters, manifest, new_error, model, written) -> dict:
        job = self.job
        new_uris = {r["uri"] for r in new_images}
        was_indexed = {row["uri"]: row["content_hash"] for row in plan
                       if row["content_hash"] is not None and row["action"] != plan_lib.DELETE}
        hash_of = {r["uri"]: r["content_hash"] for r in new_images}
        carried = job.kept + len(same)
        trained = model.quantization_error
        ratio = new_error / trained if new_error is not None and trained else None
        return {
            "mode": job.mode, "build": job.build, "index": job.root, "listed": job.listed,
            "added": sum(u not in was_indexed for u in new_uris),
            "changed": sum(u in was_indexed and hash_of[u] != was_indexed[u] for u in new_uris),
            "unchanged": carried + sum(u in was_indexed and hash_of[u] == was_indexed[u] for u in new_uris),
            "deleted": job.deleted, "rejected": len(dead_letters),
            "reused": carried, "re_extracted": len(new_images) + sum(d["stage"] == "extract" for d in dead_letters),
            "read_to_check": sum(row["action"] == plan_lib.CHECK for row in plan), "touched_unchanged": len(same),
            "images": indexed, "descriptors": manifest["counts"]["descriptors"],
            "descriptors_new": sum(r["num_features"] for r in new_images),
            "segments": manifest["counts"]["segments"], "tombstones": manifest["counts"]["tombstones"],
            "segments_written": [ref.segment_id for ref in written],
            "merged": [list(m.source_ids) for m in job.merges],
            "drift": {"new_error": new_error, "trained_error": trained, "ratio": ratio,
                      "threshold": job.drift_threshold,
                      "retrain_due": bool(ratio is not None and ratio > job.drift_threshold)},
        }


class PublishVersion(beam.DoFn):
    """The last step, on one worker: the neighbour table (when the build keeps one: the current
    version's, updated with the ``edges`` found this run), the first stage's parts (the current
    version's of the segments it keeps, and ``first_stage``, those written this run), then the version's manifest,
    verification and the pointer that makes it visible (``versions.publish``, a compare-and-swap
    against ``job.expected_token``, the pointer the run found when it took the lock: a run that lost
    its lock cannot publish over another's). Then older versions are pruned under the run's lock,
    ``job.keep`` of them kept (a reader that opened the previous one a moment ago still finds its
    files, and ``--rollback`` can return to it), the run report is written and the lock released
    (a job on a remote runner has no driver left to do it)."""

    def __init__(self, job: plan_lib.BuildJob):
        self.job = job

    def process(self, version, edges, first_stage):
        job = self.job
        manifest, report = version["manifest"], version["report"]
        with StageTimer("publish"):
            manifest["first_stage"] = first_stage_entry(job, manifest, first_stage)
            if job.neighbours is not None:

                table = next_neighbour_table(job, version, edges)
                manifest["files"]["neighbours"] = layout.write_table_file(
                    storage.join(job.root, job.build), NEIGHBOURS_FILE, table.to_table())
                manifest["neighbours"] = job.neighbours.to_json()
                report["neighbour_edges"] = len(table)
            pointer = versions.publish(job.root, job.build, manifest, job.expected_token, deep=set(version["written"]))
            scrub.clear_notes(job.root, pointer, job.scrub)
            report["previous"] = pointer.get("previous")
            report["pruned"] = versions.prune(job.root, keep=job.keep, protect={job.build})
            report["published"] = True
            report["wall_seconds"] = round(time.time() - job.started, 1)
            storage.write_bytes(storage.join(job.root, versions.REPORTS_DIR, f"{job.build_id}.json"),
                                json.dumps(report, indent=1, sort_keys=True).encode())
            if job.lock_owner:
                versions.release_lock(storage.join(job.root, versions.LOCK_FILE), job.lock_owner)
        yield report


def refuse_unless_publishable(job: plan_lib.BuildJob, indexed: int, dead_letters: list) -> None:
    """``encode.check_publishable``; a refused build keeps its dead-letter table in its folder (no
    manifest: the next run's pruning removes it), and the error names it."""

    try:
        encode.check_publishable(job.listed, indexed, dead_letters, job.max_rejected_fraction)
    except encode.PublishRefused as e:
        folder = storage.join(job.root, job.build)
        layout.write_table_file(folder, layout.DEAD_LETTERS_FILE,
                                shards.dead_letter_table(sorted(dead_letters, key=lambda r: r["uri"])))
        raise encode.PublishRefused(f"{e} (rejected inputs: {storage.join(folder, layout.DEAD_LETTERS_FILE)})") from None


def write_version_files(job: plan_lib.BuildJob, dead_letters: list) -> dict:
    """The dead-letter table into the version folder, and the plan's record."""

    folder = storage.join(job.root, job.build)
    return {
        "dead_letters": layout.write_table_file(folder, layout.DEAD_LETTERS_FILE,
                                                shards.dead_letter_table(sorted(dead_letters, key=lambda r: r["uri"]))),
        "plan": job.plan_record,
    }
