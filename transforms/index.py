"""Beam stages from features to a published index: sample descriptors, train (or load) PCA and the
quantizer, encode each image, write one Parquet shard per range of cells, then the tables and the
manifest, last. Every numerical step is a call into ``delf_retrieval``."""

from __future__ import annotations

import datetime
import uuid

import apache_beam as beam
from apache_beam.metrics import Metrics

from delf_retrieval import shards as index_files
from delf_retrieval.quantize import IndexParams
from transforms.extract import DEAD_LETTER, elapsed_us, internal_error, stage_timing

IMAGES = "images"


def new_build_id() -> str:
    """Sortable and unique: the UTC time of the launch plus a random suffix."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:8]


class ReservoirFn(beam.CombineFn):
    """A uniform sample of at most ``max_rows`` descriptors over all images, merged across workers."""

    def __init__(self, max_rows: int, seed: int = 0):
        self.max_rows = max_rows
        self.seed = seed

    def create_accumulator(self):
        from delf_retrieval.index import Reservoir

        return Reservoir(self.max_rows, self.seed)

    def add_input(self, reservoir, descriptors):
        import time

        start = time.perf_counter()
        reservoir.add(descriptors)
        stage_timing("sample").update(elapsed_us(start))
        return reservoir

    def merge_accumulators(self, reservoirs):
        reservoirs = list(reservoirs)
        merged = reservoirs[0]
        for other in reservoirs[1:]:
            merged.merge(other)
        return merged

    def extract_output(self, reservoir):
        return reservoir.result() if reservoir.seen else None


def train_model(sample, index_params: dict, pca_dim: int, expected_count: int) -> dict:
    """The separate builder's work, as one step: PCA + quantizer from the sample, as file bytes."""
    import time

    from delf_retrieval import index, quantize

    if sample is None:
        raise index.PublishRefused("no image produced features: nothing to train the index on")
    start = time.time()
    projection, quantizer = index.train(sample, quantize.IndexParams(**index_params), pca_dim, expected_count)
    stage_timing("train").update(int(round((time.time() - start) * 1e6)))
    return {**index.model_files(projection, quantizer), "sample_size": int(len(sample)),
            "train_seconds": round(time.time() - start, 1),
            "quantization_error": index.quantization_error(projection, quantizer, sample)}


class EncodeImages(beam.DoFn):
    """(InputImage, Features, hash) -> (shard, EncodedImage part) per shard the image touches, and an
    image-table record on the ``images`` output. The model arrives as a side input (file bytes)
    and is loaded once per worker. Shards are cut from ``num_shards`` when given, else from the
    ``descriptors`` side input (the total, or an upper bound of it)."""

    def __init__(self, rows_per_shard: int, num_shards: int | None):
        self.rows_per_shard = rows_per_shard
        self.num_shards = num_shards
        self._model_key = None
        self.images = Metrics.counter("delf", "images_indexed")
        self.rows = Metrics.counter("delf", "descriptors_indexed")
        self.timing = stage_timing("encode")

    def process(self, element, model, descriptors=None):
        import time

        from delf_retrieval import index, inputs

        start = time.perf_counter()
        if self._model_key != id(model):
            self.projection, self.quantizer = index.load_model_files(model)
            self._model_key = id(model)
        key, features, digest = element
        n_cells = self.quantizer.coarse.n_cells
        if self.num_shards is None and descriptors is None:
            raise ValueError("EncodeImages needs num_shards or the descriptors side input to size the shards")
        shards = self.num_shards or index.shard_count(descriptors, n_cells, self.rows_per_shard)
        try:
            image_id = inputs.image_id(key.uri)
            height, width = features.image_size
            parts = []
            if len(features):
                encoded = index.encode_image(image_id, features, self.projection, self.quantizer)
                parts = list(index.split_by_shard(encoded, n_cells, shards))
        except Exception as e:  # noqa: BLE001 - one image's failure is its dead letter, not the bundle's
            yield internal_error(key.uri, "encode", e)
            return
        self.images.inc()
        self.rows.inc(len(features))
        yield beam.pvalue.TaggedOutput(IMAGES, {"image_id": image_id, "uri": key.uri, "width": int(width),
                                                "height": int(height), "num_features": len(features),
                                                "content_hash": digest, "label": key.label})
        self.timing.update(elapsed_us(start))
        yield from parts


def train_on_sample(sample_features, listed, index_params: dict, pca_dim: int, sample_size: int):
    """The model (PCA + quantizer file bytes) trained on a reservoir of the training sample's
    descriptors, sized for listed x the sample's mean descriptors per image. It depends on the
    sample's features only, so the other images' extraction fuses with their encoding."""
    from delf_retrieval.index import expected_descriptors

    per_image = (sample_features | "TrainingPerImage" >> beam.Map(lambda r: len(r[1]))
                 | "TrainingMeanPerImage" >> beam.combiners.Mean.Globally())
    return (
        sample_features
        | "TrainingDescriptors" >> beam.Map(lambda r: r[1].descriptors)
        | "TrainingReservoir" >> beam.CombineGlobally(ReservoirFn(sample_size, index_params.get("seed", 0)))
        | "Train" >> beam.Map(lambda sample, n, per: train_model(sample, index_params, pca_dim,
                                                                 expected_descriptors(n, per)),
                              n=beam.pvalue.AsSingleton(listed), per=beam.pvalue.AsSingleton(per_image))
    )


def encode_images(features, model, rows_per_shard: int, num_shards: int | None, descriptors=None,
                  label: str = "Encode"):
    """(InputImage, Features, hash) -> EncodeImages' ``rows`` and ``images`` outputs. ``descriptors``
    (the total, or an upper bound) becomes a side input only when ``num_shards`` is not given."""
    if not num_shards and descriptors is None:
        raise ValueError("encode_images needs num_shards or a descriptors count to size the shards")
    sizes = {} if num_shards else {"descriptors": beam.pvalue.AsSingleton(descriptors)}
    return features | label >> beam.ParDo(
        EncodeImages(rows_per_shard, num_shards), model=beam.pvalue.AsSingleton(model),
        **sizes).with_outputs(IMAGES, DEAD_LETTER, main="rows")


def write_shard(element, output: str, build: str, index_id: str, m: int, bits: int) -> dict:
    """One posting shard of the version folder ``output/build``; its record's path is relative to it."""
    import time

    from delf_retrieval import index, shards, storage

    start = time.perf_counter()
    shard, parts = element
    columns = index.concatenate_parts(list(parts), m)
    table = shards.postings_table(bits=bits, **columns)
    record = shards.write_shard(storage.join(output, build), f"{shards.POSTINGS_DIR}/part-{shard:05d}.parquet", table,
                                index_id)
    stage_timing("write").update(elapsed_us(start))
    return record


class PublishIndex(beam.DoFn):
    """The last step, on one worker: model files, image and dead-letter tables and the version's
    own manifest in its folder, then the root pointer that makes it visible (``versions.publish``,
    a compare-and-swap against ``expected_token``, the pointer the run found when it took the lock);
    older builds are removed after it, under the run's lock, ``keep`` of them kept (so a reader
    that opened the previous one a moment ago still finds its files, and
    ``pipeline.reindex --rollback`` can return to it). Refuses to publish (``PublishRefused``)
    a build that lost inputs or rejected more than ``max_rejected_fraction`` of them; its
    dead-letter table is still written into its folder, to be read. Releases the lock of
    ``lock_owner`` (a job submitted to a remote runner has no driver left to do it)."""

    def __init__(self, output: str, build: str, index_id: str, model_info: dict, keep: int = 1,
                 expected_token: str | None = None, lock_owner: str | None = None,
                 max_rejected_fraction: float = 0.5):
        self.output, self.build, self.index_id, self.model_info = output, build, index_id, model_info
        self.keep, self.expected_token, self.lock_owner = keep, expected_token, lock_owner
        self.max_rejected_fraction = max_rejected_fraction

    def process(self, _, model, shard_records, image_records, dead_letters, inputs_listed):
        import time

        from delf_retrieval import index, shards, storage, versions

        start = time.perf_counter()
        images = sorted(image_records, key=lambda r: r["uri"])
        refuse_unless_publishable(self.output, self.build, inputs_listed, images, dead_letters,
                                  self.max_rejected_fraction)
        _, quantizer = index.load_model_files(model)
        files = write_version_files(self.output, self.build, model, images, dead_letters)
        records = sorted((r for r in shard_records if r["rows"]), key=lambda r: r["first_cell"])
        manifest = shards.build_manifest(self.index_id, quantizer, files, records, self.model_info,
                                         extra={"training": training_record(model)})
        manifest["counts"]["inputs"] = inputs_listed
        pointer = versions.publish(self.output, self.build, manifest, self.expected_token)
        versions.prune(self.output, keep=self.keep, protect={self.build})
        if self.lock_owner:
            versions.release_lock(storage.join(self.output, versions.LOCK_FILE), self.lock_owner)
        stage_timing("publish").update(elapsed_us(start))
        yield pointer


def refuse_unless_publishable(output: str, build: str, listed: int, images: list, dead_letters: list,
                              max_rejected_fraction: float) -> None:
    """``index.check_publishable``; a refused build keeps its dead-letter table in its folder (no
    manifest: the next run's pruning removes it), and the error names it."""
    from delf_retrieval import index, shards, storage

    try:
        index.check_publishable(listed, images, dead_letters, max_rejected_fraction)
    except index.PublishRefused as e:
        folder = storage.join(output, build)
        shards.write_table_file(folder, shards.DEAD_LETTERS_FILE,
                                shards.dead_letter_table(sorted(dead_letters, key=lambda r: r["uri"])))
        raise index.PublishRefused(f"{e} (rejected inputs: {storage.join(folder, shards.DEAD_LETTERS_FILE)})") from None


def training_record(model: dict) -> dict:
    """What the manifest records of the model's training (the error is the drift baseline)."""
    record = {"sample_size": model["sample_size"], "seconds": model["train_seconds"]}
    if model.get("quantization_error") is not None:
        record["quantization_error"] = model["quantization_error"]
    return record


def write_version_files(output: str, build: str, model: dict, images: list, dead_letters: list) -> dict:
    """Model files and the image and dead-letter tables into the version folder; their records."""
    from delf_retrieval import shards, storage

    folder = storage.join(output, build)
    return {
        "pca": shards.write_array_file(folder, shards.PCA_FILE, model["pca"]),
        "quantizer": shards.write_array_file(folder, shards.QUANTIZER_FILE, model["quantizer"]),
        "images": shards.write_table_file(folder, shards.IMAGES_FILE, shards.image_table(images)),
        "dead_letters": shards.write_table_file(folder, shards.DEAD_LETTERS_FILE,
                                                shards.dead_letter_table(sorted(dead_letters, key=lambda r: r["uri"]))),
    }


class BuildIndex(beam.PTransform):
    """(InputImage, Features, hash) of the images + dead letters + the number of listed inputs (and,
    in a training build, ``sample_features``: those of the training sample) -> the manifest of the
    published index at ``output`` (a local folder or gs:// prefix).

    Nothing waits for every image's features. A training build trains PCA + quantizer on the
    training sample alone (images chosen by hash of the uri, extracted first; their features, a
    bounded number, are held until the model exists and then encoded); with ``model_files`` (a
    fixed quantizer) there is no sample. Either way the other images' extraction fuses with their
    encoding: shards are sized from the listed inputs x ``max_features`` (an upper bound of the
    descriptors), so raw features stream through to their codes (provided ``listed`` is counted
    before the Reshuffle that spreads the images, as ``ListInputs`` does)."""

    def __init__(self, output: str, index_params: dict, pca_dim: int = 40, sample_size: int = 1_000_000,
                 model_files: dict | None = None, rows_per_shard: int = 4_000_000, num_shards: int | None = None,
                 model_info: dict | None = None, build: str | None = None, max_features: int | None = None,
                 expected_token: str | None = None, lock_owner: str | None = None, max_rejected_fraction: float = 0.5):
        super().__init__()
        self.output = output
        self.index_params = index_params
        self.pca_dim = pca_dim
        self.sample_size = sample_size
        self.model_files = model_files
        self.rows_per_shard = rows_per_shard
        self.num_shards = num_shards
        self.model_info = model_info or {}
        self.max_features = max_features
        self.expected_token, self.lock_owner = expected_token, lock_owner
        self.max_rejected_fraction = max_rejected_fraction
        if num_shards is None and not max_features:
            raise ValueError("give num_shards or max_features (the per-image bound) to size the shards")
        self.build = f"{index_files.BUILDS_DIR}/{build or new_build_id()}"
        self.index_id = uuid.uuid4().hex

    def expand(self, inputs):
        features, dead_letters, listed = inputs["features"], inputs["dead_letter"], inputs["listed"]
        pipeline = features.pipeline
        descriptors = None if self.num_shards else (
            listed | "DescriptorBound" >> beam.Map(lambda n, k: n * k, self.max_features))
        encoded = []
        if self.model_files is None:
            sample_features = inputs["sample_features"]
            model = train_on_sample(sample_features, listed, self.index_params, self.pca_dim, self.sample_size)
            encoded.append(encode_images(sample_features, model, self.rows_per_shard, self.num_shards, descriptors,
                                         label="EncodeTrainingSample"))
        else:
            model = pipeline | "GivenQuantizer" >> beam.Create([self.model_files])
        encoded.append(encode_images(features, model, self.rows_per_shard, self.num_shards, descriptors))
        dead_letters = ((dead_letters, *(e[DEAD_LETTER] for e in encoded))
                        | "AllDeadLetters" >> beam.Flatten())
        image_records = [e[IMAGES] for e in encoded] | "AllImages" >> beam.Flatten()
        defaults = IndexParams()
        m, bits = self.index_params.get("pq_m", defaults.pq_m), self.index_params.get("pq_bits", defaults.pq_bits)
        shard_records = (
            [e.rows for e in encoded] | "AllRows" >> beam.Flatten()
            | "GroupByShard" >> beam.GroupByKey()
            | "WriteShards" >> beam.Map(write_shard, self.output, self.build, self.index_id, m, bits)
        )
        return (
            pipeline
            | "Once" >> beam.Create([None])
            | "Publish" >> beam.ParDo(
                PublishIndex(self.output, self.build, self.index_id, self.model_info,
                             expected_token=self.expected_token, lock_owner=self.lock_owner,
                             max_rejected_fraction=self.max_rejected_fraction),
                model=beam.pvalue.AsSingleton(model), shard_records=beam.pvalue.AsList(shard_records),
                image_records=beam.pvalue.AsList(image_records), dead_letters=beam.pvalue.AsList(dead_letters),
                inputs_listed=beam.pvalue.AsSingleton(listed))
        )
