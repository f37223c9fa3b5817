"""Every safety check seen to fire: the accounting check fed a lost record, verify-before-publish
fed a damaged shard, the compare-and-swap fed two publishers with one token (locally and through a
fake GCS blob that enforces generations), crashes during the pointer write and just after the
version manifest, object arrays in every .npz loader, and a decompression bomb refused before its
pixels are decoded, by measured peak memory."""

import builtins
import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from delf_retrieval import npz, storage
from delf_retrieval.extraction import features as features_lib
from delf_retrieval.first_stage import parts
from delf_retrieval.index import layout, segments, versions
from delf_retrieval.quantize import Quantizer, pca
from pipeline import cli
from pipeline import run as run_job
from tests.conftest import REPO_ROOT, SAMPLES
from tests.test_hostile_inputs import TINY
from tests.test_reindex import tiny_versions  # noqa: F401 - a fixture

# ---------------------------------------------------------------------------------------------
# The accounting check, fed a lost record


def test_a_lost_image_record_stops_the_publish(tmp_path, cache_dir, monkeypatch, capsys):
    from transforms import index as index_transforms

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("01.jpg", "02.jpg", "03.jpg"):
        shutil.copy(os.path.join(SAMPLES, "berlin_cathedral", name), corpus / name)
    real = index_transforms.EncodeImages.process

    def losing_one(self, element, model, descriptors=None):
        for out in real(self, element, model, descriptors):
            tag = getattr(out, "tag", None)
            if tag == index_transforms.IMAGES and out.value["uri"].endswith("02.jpg"):
                continue  # the image table never hears of it
            yield out

    monkeypatch.setattr(index_transforms.EncodeImages, "process", losing_one)
    output = tmp_path / "index"
    assert cli.main(run_job.run, ["--input", str(corpus), "--output", str(output)] + TINY) == 1
    assert "3 inputs listed but 2 indexed + 0 rejected: 1 unaccounted for" in capsys.readouterr().err
    assert not (output / layout.MANIFEST).exists()  # nothing published


# ---------------------------------------------------------------------------------------------
# Verify before publish; compare-and-swap; crashes


def publish_first(root, build):
    version = layout.read_manifest(os.path.join(root, build))
    return versions.publish(root, build, version, None)


def test_a_damaged_shard_in_the_new_version_does_not_move_the_pointer(tiny_versions):  # noqa: F811
    root, (a, b, _) = tiny_versions
    publish_first(root, a)
    pointer, token = versions.current(root)
    version = layout.read_manifest(os.path.join(root, b))
    shard = os.path.join(root, b, version["shards"][0]["path"])
    data = bytearray(open(shard, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(shard, "wb").write(bytes(data))
    with pytest.raises(layout.ShardError, match="SHA-256"):
        versions.publish(root, b, version, token)
    assert versions.current(root) == (pointer, token)


def test_two_publishers_holding_one_token_cannot_both_write(tmp_path):
    path = str(tmp_path / "pointer.json")
    first = storage.write_bytes_if(path, b"v1", None)
    with pytest.raises(storage.PreconditionFailed):
        storage.write_bytes_if(path, b"another v1", None)
    storage.write_bytes_if(path, b"v2 by A", first)
    with pytest.raises(storage.PreconditionFailed):
        storage.write_bytes_if(path, b"v2 by B", first)
    assert open(path, "rb").read() == b"v2 by A"


def test_the_pointer_swap_itself_refuses_a_stale_token(tiny_versions, monkeypatch):  # noqa: F811
    root, (a, b, c) = tiny_versions
    publish_first(root, a)
    _, token = versions.current(root)
    versions.publish(root, b, layout.read_manifest(os.path.join(root, b)), token)
    # c's run read the pointer with the same token as b's; its own check would catch that, so make
    # both of its reads see the stale token: the conditional write is what refuses.
    real = versions.current
    monkeypatch.setattr(versions, "current", lambda r: (real(r)[0], token))
    with pytest.raises(versions.PublishConflict, match="while this one was publishing"):
        versions.publish(root, c, layout.read_manifest(os.path.join(root, c)), token)
    monkeypatch.setattr(versions, "current", real)
    assert versions.current(root)[0]["build"] == b


def test_a_crash_during_the_pointer_write_leaves_the_old_pointer(tiny_versions, monkeypatch):  # noqa: F811
    root, (a, b, _) = tiny_versions
    publish_first(root, a)
    before = open(os.path.join(root, layout.MANIFEST), "rb").read()
    real = storage.write_bytes

    def crash_on_pointer(path, data):
        if path == os.path.join(root, layout.MANIFEST):
            with open(f"{path}.tmp-crashed", "wb") as f:
                f.write(data[: len(data) // 2])
            raise OSError("killed while writing the pointer")
        return real(path, data)

    monkeypatch.setattr(storage, "write_bytes", crash_on_pointer)
    with pytest.raises(OSError, match="killed"):
        versions.publish(root, b, layout.read_manifest(os.path.join(root, b)), versions.current(root)[1])
    monkeypatch.setattr(storage, "write_bytes", real)
    assert open(os.path.join(root, layout.MANIFEST), "rb").read() == before
    assert segments.verify(root)["build"] == a  # readers still see a whole, verified version
    versions.publish(root, b, layout.read_manifest(os.path.join(root, b)), versions.current(root)[1])
    assert versions.current(root)[0]["build"] == b


def test_a_crash_just_after_the_version_manifest_leaves_it_unpublished(tiny_versions, monkeypatch):  # noqa: F811
    root, (a, b, _) = tiny_versions
    publish_first(root, a)
    _, token = versions.current(root)

    def killed(directory, deep=None):
        raise RuntimeError("killed after the version manifest was written")

    monkeypatch.setattr(segments, "verify", killed)
    with pytest.raises(RuntimeError, match="killed"):
        versions.publish(root, b, layout.read_manifest(os.path.join(root, b)), token)
    monkeypatch.undo()
    assert versions.current(root)[0]["build"] == a and versions.current(root)[1] == token
    assert json.load(open(os.path.join(root, b, layout.MANIFEST)))["previous"] == a  # written, not served
    assert versions.publish(root, b, layout.read_manifest(os.path.join(root, b)), token)["build"] == b  # a retry


# ---------------------------------------------------------------------------------------------
# GCS preconditions, through a fake blob that enforces them (the emulator ignores them)


class FakeGCS:
    """Objects with generations; conditional uploads, downloads and deletes as GCS enforces them."""

    def __init__(self):
        self.objects: dict[str, tuple[bytes, int]] = {}
        self.next_generation = 1

    def blob(self, path):
        return FakeBlob(self, path[len(storage.GCS_PREFIX):].partition("/")[2])


class FakeBucket:
    def __init__(self, store):
        self.store = store

    def get_blob(self, name, timeout=None):
        return FakeBlob(self.store, name) if name in self.store.objects else None


class FakeBlob:
    def __init__(self, store, name):
        self.store, self.name, self.bucket = store, name, FakeBucket(store)
        self.generation = store.objects.get(name, (b"", None))[1]
        self.size = len(store.objects[name][0]) if name in store.objects else None
        self.updated = None

    def _check(self, if_generation_match):
        from google.api_core import exceptions

        current = self.store.objects.get(self.name, (None, 0))[1]
        if if_generation_match is not None and int(if_generation_match) != current:
            raise exceptions.PreconditionFailed(f"{self.name}: generation {current}, not {if_generation_match}")

    def upload_from_string(self, data, if_generation_match=None):
        self._check(if_generation_match)
        self.generation = self.store.next_generation
        self.store.next_generation += 1
        self.store.objects[self.name] = (bytes(data), self.generation)

    def download_as_bytes(self, if_generation_match=None, start=None, end=None, timeout=None):
        from google.api_core import exceptions

        if self.name not in self.store.objects:
            raise exceptions.NotFound(self.name)
        self._check(if_generation_match)
        data = self.store.objects[self.name][0]
        return data if start is None else data[start:end + 1]

    def delete(self, if_generation_match=None):
        from google.api_core import exceptions

        if self.name not in self.store.objects:
            raise exceptions.NotFound(self.name)
        self._check(if_generation_match)
        del self.store.objects[self.name]

    def exists(self):
        return self.name in self.store.objects


@pytest.fixture()
def fake_gcs(monkeypatch):
    store = FakeGCS()
    monkeypatch.setattr(storage, "_blob", store.blob)
    return store


def test_gcs_conditional_writes_and_deletes_enforce_the_generation(fake_gcs):
    path = "gs://bucket/index/manifest.json"
    first = storage.write_bytes_if(path, b"v1", None)
    with pytest.raises(storage.PreconditionFailed):
        storage.write_bytes_if(path, b"v1 again", None)  # if_generation_match=0: only if absent
    second = storage.write_bytes_if(path, b"v2", first)
    with pytest.raises(storage.PreconditionFailed):
        storage.write_bytes_if(path, b"v2 by another run", first)
    assert storage.read_with_token(path) == (b"v2", second)
    with pytest.raises(storage.PreconditionFailed):
        storage.delete_if(path, first)
    storage.delete_if(path, second)
    assert storage.read_with_token(path) == (None, None)


def test_gcs_lock_and_pointer_swap_refuse_a_second_holder(fake_gcs):
    root = "gs://bucket/index"
    lock = versions.RunLock(root, ttl_seconds=3600, track_pid=False).acquire()
    with pytest.raises(versions.LockHeld):
        versions.RunLock(root, ttl_seconds=3600, track_pid=False).acquire()
    assert lock.release()
    versions._swap_pointer(root, {"build": "builds/a"}, None, "first")
    _, token = storage.read_with_token(storage.join(root, layout.MANIFEST))
    versions._swap_pointer(root, {"build": "builds/b"}, token, "second")
    with pytest.raises(versions.PublishConflict):
        versions._swap_pointer(root, {"build": "builds/c"}, token, "third, with the second's token")
    assert json.loads(storage.read_with_token(storage.join(root, layout.MANIFEST))[0])["build"] == "builds/b"
    big = "gs://bucket/photos/big.jpg"
    fake_gcs.blob(big).upload_from_string(b"\xff" * 1001)
    with pytest.raises(storage.TooLarge):
        storage.read_bounded(big, 1000)
    assert storage.read_bounded(big, 1001) == b"\xff" * 1001


# ---------------------------------------------------------------------------------------------
# No .npz loader unpickles


class Payload:
    """Unpickling this runs code: the flag shows whether a loader ever did."""

    def __reduce__(self):
        return (exec, ("import builtins; builtins.DELF_UNPICKLED = True",))


def with_object_array(valid: bytes) -> bytes:
    with np.load(io.BytesIO(valid), allow_pickle=False) as data:
        arrays = {name: data[name] for name in data.files}
    arrays["extra"] = np.array([Payload()], dtype=object)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def test_no_npz_loader_unpickles_an_object_array(tiny_versions):  # noqa: F811
    root, (a, _, _) = tiny_versions
    folder = os.path.join(root, a)
    feature_file = features_lib.Features(np.zeros((2, 2), np.float32), np.ones(2, np.float32), np.ones(2, np.float32),
                                         np.ones((2, 8), np.float32), (10, 10))
    loaders = {
        "pca": (pca.PCA.load, open(os.path.join(folder, layout.PCA_FILE), "rb").read()),
        "quantizer": (Quantizer.load, open(os.path.join(folder, layout.QUANTIZER_FILE), "rb").read()),
        "features": (features_lib.Features.from_npz, feature_file.to_npz_bytes()),
        "first stage": (lambda data: npz.read(data, parts.FORMAT_VERSION, "first-stage vectors"),
                        npz.to_bytes(parts.FORMAT_VERSION, vectors=np.zeros((2, 4), np.float16))),
    }
    for name, (load, valid) in loaders.items():
        load(valid)  # the valid file loads
        with pytest.raises(ValueError, match="allow_pickle"):
            load(with_object_array(valid))
        assert not getattr(builtins, "DELF_UNPICKLED", False), name


# ---------------------------------------------------------------------------------------------
# A decompression bomb is refused before its pixels are decoded


def test_a_decompression_bomb_is_refused_within_a_few_megabytes(tmp_path):
    bomb = tmp_path / "bomb.png"
    Image.new("1", (12_000, 12_000)).save(bomb, format="PNG")  # 144 MP: 432 MB once decoded to RGB
    script = (
        "import resource, sys\n"
        "from delf_retrieval.corpus import images\n"
        "data = open(sys.argv[1], 'rb').read()\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "try:\n"
        "    images.decode_image(data)\n"
        "except images.ImageTooLargeError:\n"
        "    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(bomb)], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.strip(), done.stderr
    assert float(done.stdout) < 20  # MB of peak memory added by the refusal
