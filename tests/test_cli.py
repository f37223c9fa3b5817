"""The command lines: feature files, re-runs that skip finished work, dead letters, pictures."""

import csv
import os
import re
import shutil

from PIL import Image

from delf_retrieval.extraction.features import Features
from pipeline import extract, run
from tests.conftest import good_matches, sample_path

FAST = ["--scales", "0.25,0.5", "--max-features", "200", "--no-progress"]


def test_extract_cli_writes_features_and_dead_letters(tmp_path, cache_dir, capsys):
    images = tmp_path / "in"
    (images / "a").mkdir(parents=True)
    (images / "b").mkdir()
    shutil.copy(sample_path("berlin_cathedral", "01.jpg"), images / "a" / "01.jpg")
    shutil.copy(sample_path("lund_street", "01.jpg"), images / "b" / "01.jpg")  # same file name, other folder
    (images / "b" / "broken.jpg").write_bytes(open(sample_path("lund_street", "02.jpg"), "rb").read()[:3000])
    (images / "b" / "empty.png").write_bytes(b"")
    out = tmp_path / "out"
    code = extract.run([str(images), "--output", str(out), "--visualize", *FAST])
    assert code == 0
    features = Features.from_npz(str(out / "a__01.npz"))
    assert 100 < len(features) <= 200 and features.image_size == (480, 640)  # the threshold may keep fewer
    assert os.path.exists(out / "b__01.npz")
    picture = Image.open(out / "a__01.attention.png")
    assert picture.size == (2 * 640 + 8, 480)
    with open(out / "rejected.csv") as f:
        rejected = {os.path.basename(r["path"]): r["reason"] for r in csv.DictReader(f)}
    assert rejected == {"broken.jpg": "truncated", "empty.png": "empty"}
    printed = capsys.readouterr().out
    assert re.search(r"^extracted\s+2$", printed, re.M) and re.search(r"rejected: truncated\s+1$", printed, re.M)

    # A re-run does no work for images already done and leaves their files alone.
    mtime = os.path.getmtime(out / "a__01.npz")
    assert extract.run([str(images), "--output", str(out), *FAST]) == 0
    assert os.path.getmtime(out / "a__01.npz") == mtime
    assert re.search(r"^already done\s+2$", capsys.readouterr().out, re.M)


def test_same_building_matches_far_better_than_another_scene(tmp_path, cache_dir):
    images = tmp_path / "corpus"
    images.mkdir()
    for name in ("01.jpg", "02.jpg"):
        shutil.copy(sample_path("berlin_cathedral", name), images / name)
    out = tmp_path / "features"
    assert extract.run([str(images), "--output", str(out), *FAST]) == 0
    assert sorted(p for p in os.listdir(out) if p.endswith(".npz")) == ["01.npz", "02.npz"]
    a, b = (Features.from_npz(str(out / n)) for n in ("01.npz", "02.npz"))
    # Two photos of the same cathedral match each other far better than they match a street.
    assert extract.run([sample_path("lund_street", "03.jpg"), "--output", str(tmp_path / "street"), *FAST]) == 0
    street = Features.from_npz(str(tmp_path / "street" / "03.npz"))
    same = good_matches(a.descriptors, b.descriptors)
    assert same > 3 * max(good_matches(a.descriptors, street.descriptors), 1)


def test_default_input_is_the_bundled_sample():
    args, beam_args = run.parse_args([])
    assert os.path.samefile(args.input, os.path.join(os.path.dirname(__file__), "..", "samples"))
    assert args.index == "output/sample-index" and beam_args == [] and args.quantizer is None
    assert len(extract.expand_inputs([args.input])) == 42
