"""Beam stages of an incremental re-index: read the run's plan, check the content of maybe-changed
images, extract only new or changed ones, carry the posting rows of unchanged images over from the
current version (re-split by cell into the new shards), measure codebook drift, and publish the new
version with a compare-and-swap on the pointer, then prune, report and release the lock."""

from __future__ import annotations

import io
import json
import time

import apache_beam as beam
import pyarrow as pa
from apache_beam.metrics import Metrics

from transforms.extract import DEAD_LETTER, ExtractImages, internal_error, read_input, split_training_sample
from transforms.index import (IMAGES, ReservoirFn, encode_images, refuse_unless_publishable, train_on_sample,
                              training_record, write_shard, write_version_files)

SAME = "same"  # checked images whose content did not change (a touched file, a rewritten object)
PLAN_FILE = "plan.parquet"

# What the run does with each listed input.
KEEP, CHECK, EXTRACT = "keep", "check", "extract"


def read_plan(path: str, actions: tuple = (KEEP, CHECK, EXTRACT)) -> list[dict]:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from delf_retrieval import storage

    table = pq.read_table(io.BytesIO(storage.read_bytes(path)))
    return table.filter(pc.is_in(table.column("action"), value_set=pa.array(list(actions)))).to_pylist()


def input_of(row: dict):
    from delf_retrieval.inputs import InputImage

    return InputImage(row["uri"], row["label"])


class CheckContent(beam.DoFn):
    """Plan rows whose stamp changed -> the image if its content hash changed too, else its uri on
    the ``same`` output (its rows are carried over; only its bytes were read, nothing extracted)."""

    def __init__(self, fetch=None):
        from delf_retrieval.inputs import FetchConfig

        self.fetch = fetch or FetchConfig()
        self.same = Metrics.counter("delf", "images_checked_unchanged")
        self.changed = Metrics.counter("delf", "images_checked_changed")

    def setup(self):
        from delf_retrieval.inputs import Fetcher

        self.fetcher = Fetcher(self.fetch)

    def process(self, row):
        from delf_retrieval import images

        data, rejected = read_input(row["uri"], self.fetcher)
        if rejected is not None:
            yield rejected
            return
        if images.content_hash(data) == row["content_hash"]:
            self.same.inc()
            yield beam.pvalue.TaggedOutput(SAME, row["uri"])
        else:
            self.changed.inc()
            yield input_of(row)


class CarryPostings(beam.DoFn):
    """One posting shard of the current version -> (new shard, columns) of the rows of images that
    are carried over, re-split by cell for the new version's shard count. The file is checked
    against its SHA-256 in the manifest; codes, keypoints and scores are copied bit for bit."""

    def __init__(self, root: str, plan_path: str, n_cells: int, num_shards: int, pq_m: int, pq_bits: int):
        self.root, self.plan_path = root, plan_path
        self.n_cells, self.num_shards, self.pq_m, self.pq_bits = n_cells, num_shards, pq_m, pq_bits
        self.kept_ids = None
        self.rows = Metrics.counter("delf", "descriptors_carried")

    def setup(self):
        import numpy as np

        from delf_retrieval import inputs

        self.kept_ids = np.sort(np.asarray([inputs.image_id(r["uri"]) for r in read_plan(self.plan_path, (KEEP,))],
                                           np.int64))

    def process(self, record, same_uris):
        try:
            yield from self._carry(record, same_uris)
        except Exception as e:  # noqa: BLE001 - the shard's failure is recorded; publishing then refuses
            yield internal_error(record["path"], "carry", e)

    def _carry(self, record, same_uris):
        import hashlib

        import numpy as np
        import pyarrow.parquet as pq

        from delf_retrieval import index, inputs, shards, storage
        from delf_retrieval.quantize import Encoded
        from delf_retrieval.quantize import pq as pq_lib

        data = storage.read_bytes(shards.resolve(self.root, record["path"]))
        if hashlib.sha256(data).hexdigest() != record["sha256"]:
            raise shards.ShardError(f"{record['path']} does not match its SHA-256 in the manifest (corrupt)")
        table = pq.read_table(io.BytesIO(data))
        carried = np.union1d(self.kept_ids, np.asarray([inputs.image_id(u) for u in same_uris], np.int64))
        ids = table.column("image_id").to_numpy()
        rows = np.flatnonzero(np.isin(ids, carried))
        if len(rows) == 0:
            return
        table = table.take(rows)
        code_bytes = pq_lib.packed_bytes(self.pq_m, self.pq_bits)
        packed = np.frombuffer(table.column("code").combine_chunks().buffers()[1], np.uint8,
                               count=table.num_rows * code_bytes).reshape(-1, code_bytes)
        cells = table.column("cell").to_numpy().astype(np.int64)
        columns = {
            "encoded": Encoded(cells, table.column("region").to_numpy().astype(np.int64),
                               pq_lib.unpack_codes(packed, self.pq_m, self.pq_bits)),
            "image_ids": table.column("image_id").to_numpy().astype(np.int64),
            "locations": np.stack([table.column("y").to_numpy(), table.column("x").to_numpy()], 1).astype(np.float32),
            "scales": table.column("scale").to_numpy(), "attentions": table.column("attention").to_numpy(),
        }
        self.rows.inc(len(rows))
        shard = index.shard_of_cells(cells, self.n_cells, self.num_shards)
        for s in np.unique(shard):
            where = np.flatnonzero(shard == s)
            yield int(s), {
                "encoded": Encoded(*(getattr(columns["encoded"], n)[where] for n in ("cells", "regions", "codes"))),
                **{n: columns[n][where] for n in ("image_ids", "locations", "scales", "attentions")},
            }


def read_model(root: str, pointer: dict) -> dict:
    """The current version's PCA + quantizer file bytes, checked, plus its training record."""
    import hashlib

    from delf_retrieval import shards, storage

    files = {}
    for name in ("pca", "quantizer"):
        record = pointer["files"][name]
        files[name] = storage.read_bytes(shards.resolve(root, record["path"]))
        if hashlib.sha256(files[name]).hexdigest() != record["sha256"]:
            raise shards.ShardError(f"{record['path']} does not match its SHA-256 in the manifest (corrupt)")
    training = pointer.get("training", {})
    return {**files, "sample_size": training.get("sample_size", 0), "train_seconds": training.get("seconds", 0.0),
            "quantization_error": training.get("quantization_error")}


def drift_error(sample, model: dict):
    """Quantization error of the new images' descriptors under the current codebooks (None if none)."""
    from delf_retrieval import index

    if sample is None:
        return None
    projection, quantizer = index.load_model_files(model)
    return index.quantization_error(projection, quantizer, sample)


class PublishVersion(beam.DoFn):
    """The last step, on one worker: the tables and model files into the version folder, its
    manifest, verification, then the pointer (compare-and-swap against the version the run started
    from: a run that lost its lock to another cannot publish over it), pruning old versions, the
    run report, and the lock's release."""

    def __init__(self, settings: dict):
        self.settings = settings  # plain data: root, build, index_id, plan, expected token, ...

    def process(self, _, model, shard_records, new_images, same_uris, dead_letters, new_error):
        from delf_retrieval import index, inputs, shards, storage, versions

        s = self.settings
        plan = read_plan(s["plan_path"])
        by_uri = {row["uri"]: row for row in plan}
        same = set(same_uris)
        images = []
        for record in new_images:
            row = by_uri[record["uri"]]
            images.append({**record, "stamp": row["stamp"]})
        for row in plan:
            if row["action"] == KEEP or (row["action"] == CHECK and row["uri"] in same):
                images.append({"image_id": inputs.image_id(row["uri"]), "uri": row["uri"], "width": row["width"],
                               "height": row["height"], "num_features": row["num_features"],
                               "content_hash": row["content_hash"], "label": row["label"], "stamp": row["stamp"]})
        images.sort(key=lambda r: r["uri"])
        carry_failed = [d for d in dead_letters if d["stage"] == "carry"]
        if carry_failed:
            raise index.PublishRefused(
                f"{len(carry_failed)} posting shards of the current version could not be carried over (first: "
                f"{carry_failed[0]['uri']}: {carry_failed[0]['error']}): not published, the current version keeps "
                "serving; run with --retrain to rebuild the index from its inputs")
        listed = len(plan) + len(s.get("listing_dead_letters", []))
        refuse_unless_publishable(s["root"], s["build"], listed, images, dead_letters, s["max_rejected_fraction"])
        _, quantizer = index.load_model_files(model)
        files = write_version_files(s["root"], s["build"], model, images, dead_letters)
        files["plan"] = s["plan_record"]
        records = sorted((r for r in shard_records if r["rows"]), key=lambda r: r["first_cell"])
        report = self.report(plan, same, images, new_images, dead_letters, records, new_error, model)
        manifest = shards.build_manifest(s["index_id"], quantizer, files, records, s["model_info"],
                                         extra={"training": training_record(model), "drift": report["drift"],
                                                "changes": {k: report[k] for k in CHANGE_COUNTS}})
        manifest["counts"]["inputs"] = listed
        pointer = versions.publish(s["root"], s["build"], manifest, s["expected_token"])
        report["previous"] = pointer.get("previous")
        report["pruned"] = versions.prune(s["root"], keep=s["keep"], protect={s["build"]})
        report["wall_seconds"] = round(time.time() - s["started"], 1)
        report["published"] = True
        storage.write_bytes(storage.join(s["root"], versions.REPORTS_DIR, f"{s['build'].split('/')[-1]}.json"),
                            json.dumps(report, indent=1, sort_keys=True).encode())
        if s.get("lock_owner"):
            versions.release_lock(storage.join(s["root"], versions.LOCK_FILE), s["lock_owner"])
        yield report

    def report(self, plan, same, images, new_images, dead_letters, shard_records, new_error, model) -> dict:
        s = self.settings
        new_uris = {r["uri"] for r in new_images}
        was_indexed = {row["uri"]: row["content_hash"] for row in plan if row["content_hash"] is not None}
        hash_of = {r["uri"]: r["content_hash"] for r in new_images}
        carried = [row for row in plan if row["action"] == KEEP or (row["action"] == CHECK and row["uri"] in same)]
        trained = model.get("quantization_error")
        ratio = new_error / trained if new_error is not None and trained else None
        return {
            "mode": s["mode"], "build": s["build"], "index": s["root"], "listed": len(plan) + len(s.get("listing_dead_letters", [])),
            "added": sum(u not in was_indexed for u in new_uris),
            "changed": sum(u in was_indexed and hash_of[u] != was_indexed[u] for u in new_uris),
            "unchanged": len(carried) + sum(u in was_indexed and hash_of[u] == was_indexed[u] for u in new_uris),
            "deleted": s["deleted"], "rejected": len(dead_letters),
            "reused": len(carried), "re_extracted": len(new_images) + sum(
                d["stage"] == "extract" for d in dead_letters),
            "read_to_check": sum(row["action"] == CHECK for row in plan), "touched_unchanged": len(same),
            "images": len(images), "descriptors": sum(r["rows"] for r in shard_records),
            "descriptors_new": sum(r["num_features"] for r in new_images),
            "drift": {"new_error": new_error, "trained_error": trained, "ratio": ratio,
                      "threshold": s["drift_threshold"],
                      "retrain_due": bool(ratio is not None and ratio > s["drift_threshold"])},
        }


CHANGE_COUNTS = ("listed", "added", "changed", "unchanged", "deleted", "rejected", "reused", "re_extracted")


class Reindex(beam.PTransform):
    """The whole run from its plan to the published version. ``settings`` (plain data from the
    driver) says the mode: 'incremental' reuses the current model and carries unchanged rows;
    'full' extracts everything and trains PCA + quantizer, as ``pipeline.run`` does."""

    def __init__(self, settings: dict, model_config: dict, extraction_config: dict, extract_options: dict,
                 index_params: dict, pointer: dict | None):
        super().__init__()
        self.s, self.model_config, self.extraction_config = settings, model_config, extraction_config
        self.extract_options, self.index_params, self.pointer = extract_options, index_params, pointer

    def expand(self, pbegin):
        s = self.s
        incremental = s["mode"] == "incremental"
        todo = (pbegin | "Plan" >> beam.Create([s["plan_path"]])
                | "ReadPlan" >> beam.FlatMap(read_plan, (CHECK, EXTRACT))
                | "SpreadPlan" >> beam.Reshuffle())
        fresh = todo | "New" >> beam.Filter(lambda r: r["action"] == EXTRACT) | "AsInputs" >> beam.Map(input_of)
        checked = (todo | "Maybe" >> beam.Filter(lambda r: r["action"] == CHECK)
                   | "CheckContent" >> beam.ParDo(CheckContent(self.extract_options.get("fetch"))).with_outputs(
                       DEAD_LETTER, SAME, main="changed"))
        to_extract = (fresh, checked.changed) | "ToExtract" >> beam.Flatten()

        def extract(images, label):
            return images | label >> ExtractImages(self.model_config, self.extraction_config, **self.extract_options)

        repeats = pbegin | "ListedAgain" >> beam.Create(s.get("listing_dead_letters", []))
        dead = [checked[DEAD_LETTER], repeats]
        encoded = []
        descriptors = None if s["num_shards"] else pbegin | "DescriptorBound" >> beam.Create([s["descriptor_bound"]])
        # Either way nothing waits for every image's features: an incremental run reuses the
        # current model (its shard count comes from the previous version's counts); a full one
        # trains on a sample of images chosen by hash of the uri, extracted first, as pipeline.run.
        if incremental:
            model = (pbegin | "Current" >> beam.Create([None])
                     | "ReadModel" >> beam.Map(lambda _, root, pointer: read_model(root, pointer), s["root"],
                                             {k: self.pointer[k] for k in ("files", "training") if k in self.pointer}))
        else:
            sample, to_extract = split_training_sample(to_extract, frozenset(s["training_sample"]))
            sample_features = extract(sample, "ExtractTrainingSample")
            dead.append(sample_features[DEAD_LETTER])
            listed = pbegin | "Listed" >> beam.Create([s["to_extract"]])
            model = train_on_sample(sample_features["features"], listed, self.index_params, s["pca_dim"],
                                    s["sample_size"])
            encoded.append(encode_images(sample_features["features"], model, s["rows_per_shard"], s["num_shards"],
                                         descriptors, label="EncodeTrainingSample"))
        extracted = extract(to_extract, "ExtractImages")
        features = extracted["features"]
        if incremental:
            new_sample = (features | "Descriptors" >> beam.Map(lambda r: r[1].descriptors)
                          | "Sample" >> beam.CombineGlobally(ReservoirFn(s["sample_size"],
                                                                         self.index_params.get("seed", 0))))
            new_error = new_sample | "Drift" >> beam.Map(drift_error, model=beam.pvalue.AsSingleton(model))
        else:
            new_error = pbegin | "NoDrift" >> beam.Create([None])
        encoded.append(encode_images(features, model, s["rows_per_shard"], s["num_shards"], descriptors))
        dead = (dead + [extracted[DEAD_LETTER]] + [e[DEAD_LETTER] for e in encoded]) | "DeadLetters" >> beam.Flatten()
        new_images = [e[IMAGES] for e in encoded] | "NewImages" >> beam.Flatten()
        rows = [e.rows for e in encoded]
        if incremental:
            params = self.pointer["params"]
            rows.append(
                pbegin | "CurrentShards" >> beam.Create(self.pointer["shards"]) | "SpreadShards" >> beam.Reshuffle()
                | "Carry" >> beam.ParDo(CarryPostings(s["root"], s["plan_path"], params["n_cells"], s["num_shards"],
                                                      params["pq_m"], params["pq_bits"]),
                                        same_uris=beam.pvalue.AsList(checked[SAME])))
        shard_records = (
            rows | "AllRows" >> beam.Flatten() | "GroupByShard" >> beam.GroupByKey()
            | "WriteShards" >> beam.Map(write_shard, s["root"], s["build"], s["index_id"],
                                        self.index_params["pq_m"], self.index_params["pq_bits"])
        )
        return (
            pbegin | "Once" >> beam.Create([None])
            | "Publish" >> beam.ParDo(
                PublishVersion(s), model=beam.pvalue.AsSingleton(model),
                shard_records=beam.pvalue.AsList(shard_records), new_images=beam.pvalue.AsList(new_images),
                same_uris=beam.pvalue.AsList(checked[SAME]), dead_letters=beam.pvalue.AsList(dead),
                new_error=beam.pvalue.AsSingleton(new_error))
        )
