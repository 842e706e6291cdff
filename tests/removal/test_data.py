"""Object-removal data: the meta.json reader on good files and on each kind of malformed entry, RORem's
pre-processing against hand computations, the joint flip, webdataset shards, the embedded sets, the
ground-truth judge, the data engine's accepted store across a checkpoint, and `lifelong check-data`."""

from __future__ import annotations

import io
import json
import math
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from cli.errors import ConfigError
from datamodules import removal
from datamodules.removal import (
    RemovalDataModule,
    Triplet,
    check_meta,
    embedded_triplets,
    human_label,
    preprocess_image,
    preprocess_mask,
    psnr_inside,
    read_meta,
    read_metas,
    read_shards,
    write_embedded_removal,
)

COUNTS = {"train": 4, "inputs": 3, "eval": 2}


def one_round(*sources: str, slot: str = "train", **extra) -> RemovalDataModule:
    """One round reading `sources` into `slot`, evaluated on an embedded set (judged under need_score)."""
    domain = "embedded:digits-on-photos" + ("-judged" if extra.get("need_score") else "")
    rounds = [{slot: list(sources), "eval": domain}]
    if slot != "train":
        rounds[0]["train"] = domain
    return RemovalDataModule(rounds=rounds, **{"counts": COUNTS, **extra})


def stacked(dataset) -> dict:
    items = [dataset[i] for i in range(len(dataset))]
    return {k: torch.stack([torch.as_tensor(it[k]) for it in items]) for k in items[0]}


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    """An embedded judged set written in RORem's layout: 5 entries with scores."""
    return write_embedded_removal(tmp_path_factory.mktemp("set"), "digits-on-photos-judged", "train", 5, 1, True)


# -- meta.json -------------------------------------------------------------------------------------------
def test_a_written_set_reads_back_as_the_embedded_triplets(written):
    assert check_meta(written, need_score=True) == []
    triplets = read_meta(written, need_score=True)
    root = written.parent
    assert triplets[0] == Triplet(root / "source/00000.png", root / "mask/00000.png", root / "GT/00000.png", 1.0)
    data = embedded_triplets("digits-on-photos-judged", "train", 5, 1)
    assert [t.score for t in triplets] == data["score"].tolist()
    got = stacked(one_round(str(written), need_score=True, counts={"eval": 2}).train_dataset(0))

    def png(x):  # what a PNG keeps of an image in [-1, 1]
        return ((x + 1) / 2 * 255).round() / 255 * 2 - 1

    assert torch.allclose(got["source"], png(data["source"]), atol=1e-6)
    assert torch.allclose(got["target"], png(data["target"]), atol=1e-6)  # GT holds the removal being judged
    assert torch.equal(got["mask"], data["mask"]) and torch.equal(got["score"], data["score"])
    assert got["has_target"].all() and got["index"].tolist() == [0, 1, 2, 3, 4]
    # Several files at once, each read against its own folder; a folder stands for its meta.json.
    assert read_metas([written, written]) == triplets + triplets
    assert len(one_round(str(written.parent), counts={"eval": 2}).train_dataset(0)) == 5


def test_check_meta_lists_every_problem_at_once_and_read_meta_raises_one_line(written, tmp_path):
    root = written.parent
    good = json.loads(written.read_text())
    (root / "junk.png").write_text("not a png")
    half = (root / "source/00001.png").read_bytes()
    (root / "half.png").write_bytes(half[: len(half) // 2])
    no_mask = {k: v for k, v in good[1].items() if k != "mask"}
    no_score = {k: v for k, v in good[0].items() if k != "score"}
    entries = [
        good[0],
        "source/00000.png",
        no_mask,
        {**good[2], "mask": "mask/x.png"},
        {**good[3], "GT": "junk.png"},
        {**good[4], "source": "half.png"},
        {**good[0], "score": "high"},
        {**good[0], "score": math.nan},
        no_score,
        {**good[1], "GT": 3},
    ]
    bad = root / "bad.json"
    bad.write_text(json.dumps(entries))
    problems = check_meta(bad, need_score=True)
    assert problems[:4] == [
        f"{bad}: entry 1: a JSON string, not an object with the keys source, mask, GT",
        f"{bad}: entry 2: no 'mask' key",
        f"{bad}: entry 3: mask 'mask/x.png' not found",
        f"{bad}: entry 4: GT 'junk.png' is not an image PIL can read (UnidentifiedImageError: cannot identify "
        f"image file '{root / 'junk.png'}')",
    ]
    assert problems[4].startswith(f"{bad}: entry 5: source 'half.png' is not an image PIL can read (")
    assert problems[5:] == [
        f"{bad}: entry 6: score 'high' is not a number",
        f"{bad}: entry 7: score nan is not finite",
        f"{bad}: entry 8: no 'score' key (discriminator data labels every entry: 1 good, 0 failed)",
        f"{bad}: entry 9: GT 3 is not a path (a string relative to the file's folder)",
    ]
    assert len(check_meta(bad)) == 8  # without need_score a missing score is fine
    with pytest.raises(ConfigError) as err:
        read_meta(bad, need_score=True)
    message = str(err.value)
    assert "\n" not in message
    assert message == (
        f"{bad}: 9 problem(s), first: entry 1: a JSON string, not an object with the keys source, mask, GT; "
        f"run `lifelong check-data {bad} --need_score` to list them all"
    )
    # The datamodule names the option the file came from.
    with pytest.raises(ConfigError, match=r"^data\.rounds\[0\]\.train: .*bad\.json: 8 problem\(s\)"):
        one_round(str(bad)).setup()
    # Problems of the whole file.
    cases = {
        "missing.json": (None, "not found"),
        "lines.json": ('{"a": 1}\n{"a": 2}\n', "not JSON (line 2, column 1: Extra data); one object per line is "),
        "text.json": ("[1,", "not JSON (line 1, column 4"),
        "object.json": ('{"source": "s.png"}', "holds a JSON object, not an array of {source, mask, GT} objects"),
        "empty.json": ("[]", "an empty array"),
    }
    for name, (content, expected) in cases.items():
        if content is not None:
            (tmp_path / name).write_text(content)
        found = check_meta(tmp_path / name)
        assert len(found) == 1 and found[0].startswith(f"{tmp_path / name}: {expected}"), found


def test_entries_without_gt_are_inputs_only(written, tmp_path):
    entries = [{k: v for k, v in e.items() if k != "GT"} for e in json.loads(written.read_text())]
    meta = written.parent / "inputs.json"
    meta.write_text(json.dumps(entries))
    with pytest.raises(ConfigError, match=r"data\.rounds\[0\]\.train: .*entry 0: no 'GT' key"):
        one_round(str(meta)).setup()
    inputs = one_round(str(meta), slot="inputs").round_inputs(0)
    item = inputs[2]
    assert len(inputs) == 5 and not item["has_target"] and torch.equal(item["target"], item["source"])


def test_train_entries_may_lack_gt_when_the_method_reads_only_source_and_mask(written):
    entries = [{k: v for k, v in e.items() if k != "GT"} for e in json.loads(written.read_text())]
    meta = written.parent / "inputs_for_training.json"
    meta.write_text(json.dumps(entries))
    train = one_round(str(meta), train_needs_target=False).train_dataset(0)
    assert len(train) == 5 and not bool(train[0]["has_target"])


def test_preference_pairs_read_the_preferred_as_target_and_carry_the_rejected(written):
    entries = json.loads(written.read_text())
    pairs = [
        {"source": e["source"], "mask": e["mask"], "preferred": e["GT"], "rejected": entries[-1 - i]["GT"]}
        for i, e in enumerate(entries)
    ]
    meta = written.parent / "pairs.json"
    meta.write_text(json.dumps(pairs))
    (record,) = read_meta(meta)[:1]
    assert record.target == written.parent / entries[0]["GT"] and record.rejected == written.parent / entries[-1]["GT"]
    item = one_round(str(meta)).train_dataset(0)[1]
    plain = one_round(str(written)).train_dataset(0)
    assert torch.equal(item["target"], plain[1]["target"]) and torch.equal(item["rejected"], plain[3]["target"])
    broken = written.parent / "broken_pairs.json"
    broken.write_text(json.dumps([{"source": e["source"], "mask": e["mask"], "rejected": e["GT"]} for e in entries]))
    assert "entry 0: a preference pair (it has 'rejected') without a 'preferred' key" in check_meta(broken)[0]


def test_shared_eval_gives_every_round_the_first_rounds_held_out_images():
    rounds = [{"train": "embedded:digits-on-photos", "eval": "embedded:digits-on-photos"}] * 2
    rounds = [dict(r, name=f"r{k}") for k, r in enumerate(rounds)]
    shared = RemovalDataModule(rounds=rounds, counts=COUNTS, shared_eval=True)
    own = RemovalDataModule(rounds=rounds, counts=COUNTS)
    assert torch.equal(stacked(shared.eval_dataset(1))["source"], stacked(shared.eval_dataset(0))["source"])
    assert not torch.equal(stacked(own.eval_dataset(1))["source"], stacked(own.eval_dataset(0))["source"])


# -- pre-processing --------------------------------------------------------------------------------------
def test_preprocessing_squashes_scales_and_keeps_the_mask_soft():
    # A constant 30 x 10 image: every resized pixel is the colour, scaled to [-1, 1].
    flat = Image.new("RGB", (30, 10), (200, 100, 50))
    x = preprocess_image(flat, 8)
    assert x.shape == (3, 8, 8)
    for c, v in enumerate((200, 100, 50)):
        assert torch.allclose(x[c], torch.full((8, 8), v / 255 * 2 - 1))
    # Squashed, not cropped: the left quarter of an 80 x 10 image (dark) stays in the left columns.
    quarters = np.full((10, 80, 3), 255, np.uint8)
    quarters[:, :20] = 0
    q = preprocess_image(Image.fromarray(quarters), 8)
    assert (q[:, :, 0] < -0.8).all() and (q[:, :, 3:] > 0.9).all()
    # Random content: exactly PIL's bicubic resize to R x R, / 255, * 2 - 1 (spec 1.2).
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (12, 20, 3), dtype=np.uint8)
    ref = np.asarray(Image.fromarray(arr).resize((8, 8), Image.Resampling.BICUBIC)).astype(np.float32)
    assert torch.allclose(
        preprocess_image(Image.fromarray(arr), 8), torch.from_numpy(ref).permute(2, 0, 1) / 255 * 2 - 1
    )
    # The mask is channel 0 / 255 (not the luminance), soft unless binarized at 0.5.
    mask = Image.new("RGB", (30, 10), (200, 0, 0))
    assert torch.allclose(preprocess_mask(mask, 8), torch.full((1, 8, 8), 200 / 255))
    for value, binary in ((128, 1.0), (127, 0.0)):
        m = Image.new("RGB", (30, 10), (value, value, value))
        assert torch.allclose(preprocess_mask(m, 8), torch.full((1, 8, 8), value / 255))
        assert torch.equal(preprocess_mask(m, 8, binarize=True), torch.full((1, 8, 8), binary))


def test_the_datamodule_binarizes_and_resizes_on_request(written):
    soft = stacked(one_round(str(written), resolution=12, counts={"eval": 2}).train_dataset(0))["mask"]
    hard = stacked(one_round(str(written), resolution=12, counts={"eval": 2}, binarize_mask=True).train_dataset(0))
    assert soft.shape == (5, 1, 12, 12) and hard["source"].shape == (5, 3, 12, 12)
    assert ((soft > 0) & (soft < 1)).any()  # bicubic edges
    assert torch.equal(hard["mask"], (soft >= 0.5).float())


# -- the joint flip --------------------------------------------------------------------------------------
def test_training_batches_flip_source_mask_and_target_together(monkeypatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "3")
    dm = RemovalDataModule(rounds=[{"train": "embedded:patches-on-photos", "eval": "embedded:patches-on-photos"}],
                           counts={"train": 16, "eval": 1})  # fmt: skip
    batch = stacked(dm.train_dataset(0))

    def step(step: int, training: bool = True):
        dm.trainer = SimpleNamespace(training=training, global_step=step, global_rank=0)
        return dm.on_after_batch_transfer(dict(batch), 0)

    out = step(7)
    flipped = []
    for i in range(16):
        same = [torch.equal(out[k][i], batch[k][i]) for k in ("source", "mask", "target")]
        mirrored = [torch.equal(out[k][i], batch[k][i].flip(-1)) for k in ("source", "mask", "target")]
        assert all(same) != all(mirrored)  # all three kept or all three mirrored
        flipped.append(all(mirrored))
    assert 0 < sum(flipped) < 16
    again = step(7)
    assert all(torch.equal(out[k], again[k]) for k in ("source", "mask", "target"))  # the same step, the same flips
    assert any(not torch.equal(out["source"], step(s)["source"]) for s in (8, 9, 10))
    evaluated = step(7, training=False)
    assert all(evaluated[k] is batch[k] for k in batch)
    dm.random_flip = False
    assert torch.equal(step(7)["source"], batch["source"])


# -- webdataset shards -----------------------------------------------------------------------------------
def write_shard(path: Path, meta: Path, keys: list[int], skip: str | None = None) -> None:
    entries = json.loads(meta.read_text())
    with tarfile.open(path, "w") as archive:
        for k in keys:
            e = entries[k]
            members = {"source.png": e["source"], "mask.png": e["mask"], "gt.png": e["GT"]}
            for suffix, rel in members.items():
                if suffix != skip:
                    data = (meta.parent / rel).read_bytes()
                    info = tarfile.TarInfo(f"s{k:03d}.{suffix}")
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))
            score = str(e["score"]).encode()
            info = tarfile.TarInfo(f"s{k:03d}.score.txt")
            info.size = len(score)
            archive.addfile(info, io.BytesIO(score))


def test_shards_read_back_like_the_meta_json_and_name_what_is_missing(written, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_shard(tmp_path / "part-0.tar", written, [0, 1, 2])
    write_shard(tmp_path / "part-1.tar", written, [3, 4])
    samples = read_shards("part-{0..1}.tar", need_score=True)
    assert [s.name for s in samples] == [f"part-{p}.tar:s{k:03d}" for p, k in ((0, 0), (0, 1), (0, 2), (1, 3), (1, 4))]
    from_shards = stacked(one_round("part-{0..1}.tar", need_score=True, counts={"eval": 2}).train_dataset(0))
    from_meta = stacked(one_round(str(written), counts={"eval": 2}).train_dataset(0))
    assert all(torch.equal(from_shards[k], from_meta[k]) for k in from_meta)
    write_shard(tmp_path / "part-1.tar", written, [3, 4], skip="mask.png")
    with pytest.raises(ConfigError) as err:
        read_shards("part-{0..1}.tar", option="data.rounds[0].train")
    assert str(err.value).startswith(
        "data.rounds[0].train: part-{0..1}.tar: 2 problem(s), first: part-1.tar: sample 's003': no mask image "
        "(it has ['gt.png', 'score.txt', 'source.png'])"
    )
    shard = tmp_path / "part-1.tar"
    write_shard(shard, written, [3, 4])
    shard.write_bytes(shard.read_bytes()[:1500])
    with pytest.raises(ConfigError, match=r"part-1\.tar: not a complete tar shard .*; re-create it") as err:
        read_shards("part-{0..1}.tar")
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"shard part-2\.tar not found \(1 of 3 missing\)"):
        one_round("part-{0..2}.tar")


# -- the embedded sets -----------------------------------------------------------------------------------
def test_embedded_objects_lie_inside_their_masks_and_are_seeded(monkeypatch):
    for domain in ("digits-on-photos", "patches-on-photos"):
        data = embedded_triplets(domain, "train", 6, seed=2)
        outside = data["mask"] == 0
        assert torch.equal(data["source"] * outside, data["target"] * outside)  # source == target outside
        inside = (data["source"] - data["target"]).abs().sum(1, keepdim=True) > 0
        assert inside.any() and not (inside & outside).any()
        assert set(data["mask"].unique().tolist()) == {0.0, 1.0} and data["source"].abs().max() <= 1
        again = embedded_triplets(domain, "train", 6, seed=2)
        assert all(torch.equal(data[k], again[k]) for k in ("source", "mask", "target"))
        assert not torch.equal(data["source"], embedded_triplets(domain, "train", 6, seed=3)["source"])
        assert not torch.equal(data["target"], embedded_triplets(domain, "test", 6, seed=2)["target"])
    # Training and input images use the train digits, evaluation images the held-out ones.
    asked = []
    real = removal.world.digits_split
    monkeypatch.setattr(removal.world, "digits_split", lambda split: asked.append(split) or real(split))
    dm = RemovalDataModule(
        rounds=[{"train": "embedded:digits-on-photos", "inputs": "embedded:digits-on-photos",
                 "eval": "embedded:digits-on-photos"}],
        counts={"train": 2, "inputs": 2, "eval": 2},
    )  # fmt: skip
    dm.setup()
    assert asked == ["train"] * 4 + ["test"] * 2


def test_judged_sets_are_labelled_by_the_ground_truth_rule():
    data = embedded_triplets("patches-on-photos-judged", "train", 64, seed=0)
    assert torch.equal(data["score"], human_label(data["target"], data["gt"], data["mask"]))
    assert 0.3 <= data["score"].mean() <= 0.7
    outside = data["mask"] == 0
    assert torch.equal(data["target"] * outside, data["gt"] * outside)
    with pytest.raises(ConfigError, match="has no scores and data.need_score is set"):
        one_round("embedded:digits-on-photos", need_score=True)


def test_human_label_against_a_hand_computation():
    gt = torch.zeros(2, 3, 4, 4)
    mask = torch.zeros(2, 1, 4, 4)
    mask[:, :, :2, :2] = 1.0
    mask[:, :, 3, 3] = 0.5  # counts (>= 0.5)
    mask[:, :, 0, 3] = 0.49  # does not
    result = gt.clone()
    result[:, :, 2:, :2] = 1.0  # errors outside the mask do not count
    result[:, :, 0, 3] = 1.0
    inside = mask >= 0.5
    result[0] = torch.where(inside[0], torch.tensor(0.1), result[0])  # 0.05 on [0, 1]: MSE 0.0025
    result[1] = torch.where(inside[1], torch.tensor(0.6), result[1])  # 0.3 on [0, 1]: MSE 0.09
    expected = torch.tensor([10 * math.log10(1 / 0.0025), 10 * math.log10(1 / 0.09)])  # 26.02 dB, 10.46 dB
    assert torch.allclose(psnr_inside(result, gt, mask), expected, atol=1e-4)
    assert human_label(result, gt, mask).tolist() == [1.0, 0.0]
    assert human_label(result, gt, mask, 30.0).tolist() == [0.0, 0.0]
    assert psnr_inside(gt[0], gt[0], mask[0]).item() == math.inf  # one image, exact: a scalar
    assert removal.HUMAN_THRESHOLD_DB == 20.0


# -- rounds and the data engine's store ------------------------------------------------------------------
def test_accepted_removals_join_the_next_round_and_survive_a_checkpoint(tmp_path):
    rounds = [
        {"name": "init", "train": "embedded:digits-on-photos", "inputs": "embedded:patches-on-photos",
         "eval": "embedded:digits-on-photos"},
        {"eval": ["embedded:patches-on-photos", "embedded:digits-on-photos"]},
    ]  # fmt: skip
    dm = RemovalDataModule(rounds=rounds, counts=COUNTS)
    assert dm.task_names == ["init", "round-1"] and dm.train_on == "seen"
    assert dm.stream.resolution == 32 and dm.stream.input_shape == (3, 32, 32)
    assert len(dm.train_dataset(0)) == 4 and len(dm.train_dataset(1)) == 0
    assert len(dm.round_inputs(0)) == 3 and len(dm.round_inputs(1)) == 0
    assert [it["index"] for it in (dm.eval_dataset(1)[i] for i in range(4))] == [0, 1, 2, 3]
    inputs = stacked(dm.round_inputs(0))
    items = {"source": inputs["source"][:2], "mask": inputs["mask"][:2], "target": -inputs["source"][:2],
             "score": torch.tensor([0.9, 0.95])}  # fmt: skip
    dm.accept(0, items)
    assert dm.accepted_count(0) == 2 and dm.accepted_count(1) == 0
    got = stacked(dm.train_dataset(1))
    assert all(torch.equal(got[k], items[k]) for k in items) and got["has_target"].all()
    assert len(dm.train_dataset(0)) == 4  # round 0's own data is unchanged
    path = tmp_path / "dm.pt"
    torch.save(dm.state_dict(), path)
    resumed = RemovalDataModule(rounds=rounds, counts=COUNTS)
    resumed.load_state_dict(torch.load(path, weights_only=True))
    again = stacked(resumed.train_dataset(1))
    assert all(torch.equal(again[k], got[k]) for k in got) and resumed.accepted_count(0) == 2
    dm.accept(0, {k: v[:0] for k, v in items.items()})  # a later call for the round replaces the earlier one
    assert dm.accepted_count(0) == 0
    with pytest.raises(ValueError, match=r"mask has shape \(2, 3, 32, 32\)"):
        dm.accept(0, {**items, "mask": items["source"]})


@pytest.mark.parametrize(
    ("rounds", "extra", "expected"),
    [
        ([], {}, "data.rounds is empty"),
        ([{"train": "embedded:digits-on-photos", "eval": "x", "gt": 1}], {},
         "data.rounds[0]: unknown key 'gt'; a round has the keys name, train, inputs, eval"),
        ([{"train": "embedded:digits"}], {}, "embedded domain 'digits' does not exist; choose one of digits-on-photos"),
        ([{"train": "embedded:digits-on-photos"}], {}, "data.rounds[0] (round-0): no eval data"),
        ([{"eval": "embedded:digits-on-photos"}], {}, "data.rounds: no round has train data"),
        ([{"eval": "embedded:digits-on-photos"}, {"train": "embedded:digits-on-photos",
          "eval": "embedded:digits-on-photos"}], {}, "data.rounds[0] (round-0): the first round has no train data"),
        ([{"train": "nope/meta.json", "eval": "embedded:digits-on-photos"}], {},
         "data.rounds[0].train: nope/meta.json not found"),
        ([{"train": "embedded:digits-on-photos", "eval": "embedded:digits-on-photos"}], {"resolution": 4},
         "data.resolution must be at least 8"),
        ([{"train": "embedded:digits-on-photos", "eval": "embedded:digits-on-photos"}], {"counts": {"test": 3}},
         "data.counts: unknown key 'test'"),
        ([{"name": "a", "train": "embedded:digits-on-photos", "eval": "embedded:digits-on-photos"}] * 2, {},
         "data.rounds[1].name: 'a' names an earlier round too"),
    ],
)  # fmt: skip
def test_bad_settings_are_one_line_naming_the_option(rounds, extra, expected):
    with pytest.raises(ConfigError) as err:
        RemovalDataModule(rounds=rounds, **extra)
    assert expected in str(err.value) and "\n" not in str(err.value)


# -- lifelong check-data ---------------------------------------------------------------------------------
def test_check_data_lists_every_problem_then_exits_2(written, capsys):
    from cli.main import main

    main(["check-data", str(written), str(written.parent), "--need_score"])
    out = capsys.readouterr()
    assert out.out.splitlines() == ["ok: 10 entries in 2 file(s)"] and out.err == ""
    bad = written.parent / "two_bad.json"
    good = json.loads(written.read_text())
    bad.write_text(json.dumps([good[0], {"source": "source/00000.png"}]))
    with pytest.raises(SystemExit) as exit_info:
        main(["check-data", str(written), str(bad), "--need_score"])
    out = capsys.readouterr()
    assert exit_info.value.code == 2
    assert out.out.splitlines() == [f"{bad}: entry 1: no 'mask' key", f"{bad}: entry 1: no 'GT' key",
                                    f"{bad}: entry 1: no 'score' key (discriminator data labels every entry: 1 good, "
                                    "0 failed)"]  # fmt: skip
    assert out.err.splitlines() == [f"lifelong: error: 3 problem(s) in 1 file(s); first: {bad}: entry 1: no 'mask' key"]
