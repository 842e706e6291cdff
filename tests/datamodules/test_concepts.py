import hashlib
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, default_collate

from cli.errors import ConfigError
from datamodules.concepts import (
    SMALL_PREFIXES,
    ZOOM_PREFIXES,
    ConceptDataModule,
    ConceptStream,
    augment_batch,
    augment_target,
    augmented_caption,
    write_embedded_concepts,
    write_embedded_digit_concepts,
)

R, D = 64, 8  # training resolution and latent downsampling of the tests


def write_png(path: Path, seed: int, size: tuple[int, int] = (56, 40)) -> None:
    """A random image that is never black (so a pasted copy stands out from the canvas)."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(80, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def write_concept(root: Path, name: str, captions: list[str], prompts: list[str] | None = None) -> None:
    for i in range(len(captions)):
        write_png(root / name / f"img{i}.png", seed=zlib.crc32(f"{name}{i}".encode()))
    (root / name / "caption.txt").write_text("\n".join(captions) + "\n")
    if prompts is not None:
        (root / "prompts").mkdir(exist_ok=True)
        (root / "prompts" / f"{name}.txt").write_text("\n".join(prompts) + "\n")


def write_reg(root: Path, cls: str, n: int) -> None:
    for i in range(n):
        write_png(root / "reg" / cls / f"{i:03d}.jpg", seed=500 + i, size=(48, 48))


@pytest.fixture
def concepts(tmp_path: Path) -> Path:
    """dog1 (3 images, captions with `<new>`), cat (2 images, captions with a stray `<new7>`); 4 reg per class."""
    write_concept(
        tmp_path,
        "dog1",
        ["<new> dog, sitting", "<new> dog, running", "<new> dog, asleep"],
        ["photo of a {}", "a <new1> dog on a beach", "{} in the snow"],
    )
    write_concept(tmp_path, "cat", ["<new7> cat, on a sofa", "<new7> cat, grey"])
    write_reg(tmp_path, "dog", 4)
    write_reg(tmp_path, "cat", 5)
    return tmp_path


def module(root: Path, **kwargs) -> ConceptDataModule:
    kwargs = {"resolution": R, "mask_downsample": D, "clip_resolution": 32, **kwargs}
    return ConceptDataModule(root=str(root), **kwargs)


def test_stream_names_tokens_classes_and_gate_prompts(concepts):
    dm = module(concepts, concepts=["dog1", "cat"])
    stream = dm.stream
    assert isinstance(stream, ConceptStream)
    assert dm.task_names == ["dog1", "cat"] and stream.task_names == ("dog1", "cat")
    assert stream.tokens == ("<new1>", "<new2>") and stream.classes == ("dog", "cat")
    assert stream.gate_prompts == ("photo of a <new1> dog, sitting", "photo of a <new2> cat, on a sofa")
    assert stream.resolution == R and stream.num_tasks == 2
    # inference routes as the released sampling script ("photo of a <token> <class>"); `caption`: as training
    assert stream.inference_gate_prompts == ("photo of a <new1> dog", "photo of a <new2> cat")
    by_caption = module(concepts, concepts=["dog1", "cat"], inference_gate="caption").stream
    assert by_caption.inference_gate_prompts == by_caption.gate_prompts == stream.gate_prompts
    # a stream built by hand without inference gate prompts gets the token-class ones
    hand = ConceptStream(task_names=("a",), tokens=("<new1>",), classes=("mug",), gate_prompts=("photo of a x",))
    assert hand.inference_gate_prompts == ("photo of a <new1> mug",)
    # default order: sorted folders holding a caption.txt (reg/ and prompts/ are not concepts)
    assert module(concepts).task_names == ["cat", "dog1"]
    assert module(concepts, classes={"dog1": "puppy"}, prior_preservation=False).stream.classes == ("cat", "puppy")


def test_captions_take_the_concepts_token(concepts):
    dm = module(concepts, concepts=["dog1", "cat"], augment=False)
    dm.setup()
    dog, cat = dm.train_dataset(0), dm.train_dataset(1)
    assert [dog[i]["caption"] for i in range(4, 7)] == [
        "photo of a <new1> dog, sitting",
        "photo of a <new1> dog, running",
        "photo of a <new1> dog, asleep",
    ]
    assert cat[5]["caption"] == "photo of a <new2> cat, on a sofa"


def test_train_items_reg_half_then_targets(concepts):
    dm = module(concepts, concepts=["dog1", "cat"])
    dm.setup()
    for t, n_reg, cls in ((0, 4, "dog"), (1, 5, "cat")):
        ds = dm.train_dataset(t)
        assert len(ds) == 2 * n_reg
        for i in range(len(ds)):
            item = ds[i]
            assert set(item) == {"pixels", "mask", "caption", "line", "is_reg", "task"}
            assert item["pixels"].shape == (3, R, R) and item["pixels"].dtype == torch.float32
            assert -1.0 <= item["pixels"].min() and item["pixels"].max() <= 1.0
            assert item["mask"].shape == (1, R // D, R // D) and item["mask"].dtype == torch.float32
            assert set(item["mask"].unique().tolist()) <= {0.0, 1.0}
            assert item["task"].dtype == torch.int64 and int(item["task"]) == t
            assert item["is_reg"].dtype == torch.bool and bool(item["is_reg"]) == (i < n_reg)
            if i < n_reg:
                assert item["caption"] == f"photo of a {cls}" and bool((item["mask"] == 1).all())
            else:
                assert item["caption"].startswith("photo of a ") and f"<new{t + 1}> {cls}" in item["caption"]


def test_num_reg_images_and_no_prior_preservation(concepts):
    dm = module(concepts, concepts=["dog1", "cat"], num_reg_images=2)
    dm.setup()
    assert [len(dm.train_dataset(t)) for t in range(2)] == [4, 4]
    (concepts / "reg" / "dog" / "000.jpg").unlink()
    for p in (concepts / "reg" / "cat").iterdir():
        p.unlink()
    dm = module(concepts, concepts=["dog1", "cat"], prior_preservation=False)  # reg folders not needed
    dm.setup()
    ds = dm.train_dataset(0)
    assert len(ds) >= 50 and len(ds) % 3 == 0
    assert not any(bool(ds[i]["is_reg"]) for i in range(len(ds)))


def test_without_augmentation_items_are_the_resized_images(concepts):
    """`resize: center_crop` (the released code) cuts the centred square at (h - s) // 2 .. (h + s) // 2 of the
    56 x 40 photo, then resizes it bicubically; `stretch` squashes the whole photo."""
    photo = np.array(Image.open(concepts / "dog1" / "img0.png").convert("RGB"))
    h, w = photo.shape[:2]
    s = min(h, w)
    square = photo[(h - s) // 2 : (h + s) // 2, (w - s) // 2 : (w + s) // 2]
    assert square.shape[:2] == (40, 40) and (w - s) // 2 == 8
    for resize, source in (("center_crop", square), ("stretch", photo)):
        dm = module(concepts, concepts=["dog1", "cat"], augment=False, resize=resize)
        dm.setup()
        ds = dm.train_dataset(0)
        a, b = ds[4], ds[4]
        assert torch.equal(a["pixels"], b["pixels"]) and bool((a["mask"] == 1).all())
        expected = np.array(Image.fromarray(source).resize((R, R), Image.BICUBIC))
        expected = torch.from_numpy(expected).permute(2, 0, 1).float() / 127.5 - 1
        assert torch.equal(a["pixels"], expected), resize
        assert torch.equal(ds[0]["pixels"], ds[0]["pixels"])  # reg items are not flipped either


@pytest.mark.parametrize(("canvas", "background"), [("grey", 0.0), ("black", -1.0)])
def test_augmentation_branches_and_their_masks(canvas, background):
    R = 128  # at 64 px a far-away copy can be too small to keep any latent pixel
    torch.manual_seed(0)
    image = torch.rand(3, R, R) * 0.5 + 0.25  # far from 0 and -1, so either canvas is recognisable
    seen = set()
    for _ in range(300):
        pixels, mask, prefix = augment_target(image, D, canvas)
        assert pixels.shape == (3, R, R) and mask.shape == (1, R // D, R // D)
        assert -1 <= pixels.min() and pixels.max() <= 1
        if prefix in SMALL_PREFIXES:
            pasted = (pixels != background).any(0)
            assert bool((pixels[:, ~pasted] == background).all())  # the canvas: released grey or black
            rows, cols = pasted.any(1).nonzero().squeeze(1), pasted.any(0).nonzero().squeeze(1)
            y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
            size = y1 - y0
            assert size == x1 - x0 and round(170 / 512 * R) <= size < 0.6 * R
            assert bool(pasted[y0:y1, x0:x1].all()) and int(pasted.sum()) == size * size
            # latent cells of the pasted square, less the boundary cell at its start and one more at its end
            expected = torch.zeros_like(mask)
            expected[:, y0 // D + 1 : y1 // D - 1, x0 // D + 1 : x1 // D - 1] = 1
            assert torch.equal(mask, expected) and bool(mask.any())
            full = mask[0].repeat_interleave(D, 0).repeat_interleave(D, 1).bool()
            inside = torch.zeros(R, R, dtype=torch.bool)
            inside[y0 + 1 : y1 - D, x0 + 1 : x1 - D] = True
            assert not bool((full & ~inside).any())  # zero outside the pasted square, with a margin
            seen.add("small")
        elif prefix in ZOOM_PREFIXES:
            assert bool((mask == 1).all()) and not bool((pixels == background).all(0).any())
            seen.add("zoom")
        else:
            assert prefix == "" and bool((mask == 1).all())
            assert torch.equal(pixels, image) or torch.equal(pixels, image.flip(-1))
            seen.add("plain")
    assert seen == {"small", "zoom", "plain"}


def test_augmentation_prefixes_the_whole_caption_or_inserts_after_photo_of_a():
    line = "<new1> dog, sitting"
    assert augmented_caption(line, "a far away ") == "a far away photo of a <new1> dog, sitting"  # released
    assert augmented_caption(line, "close up ") == "close up photo of a <new1> dog, sitting"
    assert augmented_caption(line, "a far away ", "insert") == "photo of a far away <new1> dog, sitting"
    assert augmented_caption(line, "very small ", "insert") == "photo of a very small <new1> dog, sitting"
    assert augmented_caption(line, "zoomed in ", "insert") == "photo of a zoomed in <new1> dog, sitting"
    assert augmented_caption(line, "") == augmented_caption(line, "", "insert") == "photo of a <new1> dog, sitting"


@pytest.mark.parametrize(
    ("augment_caption", "starts"),
    [
        ("prefix", ("a far away photo of a ", "very small photo of a ")),
        ("insert", ("photo of a far away ", "photo of a very small ")),
    ],
)
def test_small_scale_items_have_far_away_captions_and_masks(concepts, augment_caption, starts):
    dm = module(concepts, concepts=["dog1", "cat"])
    dm.setup()
    ds = dm.train_dataset(0)
    torch.manual_seed(1)
    for _ in range(200):
        batch = augment_batch(default_collate([ds[5]]), D, augment_caption)  # what the datamodule does
        item = {k: v[0] for k, v in batch.items()}
        if "far away" in item["caption"] or "very small" in item["caption"]:
            assert item["caption"].split("<new1>")[0] in starts
            assert item["mask"].sum() < (R // D) ** 2  # may be empty at 64 px
            outside = item["mask"][0].repeat_interleave(D, 0).repeat_interleave(D, 1) == 0
            canvas = (item["pixels"] == 0).all(0)  # the released grey canvas
            assert bool(canvas.any())
            assert not bool((canvas & ~outside).any())  # the mask never covers canvas
            break
    else:
        pytest.fail("no small-scale sample in 200 draws")


def test_eval_items(concepts):
    dm = module(concepts, concepts=["dog1", "cat"], prior_preservation=False)
    dm.setup()
    dog = dm.eval_dataset(0)
    assert [dog[i]["prompt"] for i in range(len(dog))] == [
        "photo of a <new1> dog",
        "a <new1> dog on a beach",
        "<new1> dog in the snow",
    ]
    assert [dog[i]["prompt_plain"] for i in range(len(dog))] == [
        "photo of a dog",
        "a dog on a beach",
        "dog in the snow",
    ]
    item = dog[0]
    assert item["reference"].shape == (3, 3, 32, 32) and item["reference"].dtype == torch.uint8
    assert item["task"].dtype == torch.int64 and int(item["task"]) == 0
    cat = dm.eval_dataset(1)  # no prompts file: the default prompt
    assert len(cat) == 1 and cat[0]["prompt"] == "photo of a <new2> cat" and cat[0]["prompt_plain"] == "photo of a cat"
    assert (
        len(module(concepts, concepts=["dog1"], max_eval_prompts=2, prior_preservation=False)._catalog()[0].prompts)
        == 2
    )


def test_batches_through_the_default_collate(concepts):
    dm = module(concepts, concepts=["dog1", "cat"])
    dm.setup()
    batch = next(iter(DataLoader(dm.train_dataset(0), batch_size=4)))
    assert batch["pixels"].shape == (4, 3, R, R) and batch["mask"].shape == (4, 1, R // D, R // D)
    assert batch["caption"] == ["photo of a dog"] * 4 and batch["is_reg"].tolist() == [True] * 4
    assert batch["task"].tolist() == [0] * 4
    dm.set_task(1)
    batch = next(iter(dm.train_dataloader()))
    assert len(batch["caption"]) == 2 and all(isinstance(c, str) for c in batch["caption"])
    (evaluation,) = [next(iter(loader)) for loader in dm.eval_dataloaders()][:1]
    assert isinstance(evaluation["prompt"], list) and evaluation["reference"].shape == (3, 3, 3, 32, 32)


def test_embedded_default(tmp_path):
    dm = ConceptDataModule(resolution=R, clip_resolution=32)
    stream = dm.stream
    assert stream.task_names == ("cat", "cup", "rocket") and stream.classes == ("cat", "cup", "rocket")
    assert stream.tokens == ("<new1>", "<new2>", "<new3>")
    assert [p.split(",")[0] for p in stream.gate_prompts] == [
        "photo of a <new1> cat",
        "photo of a <new2> cup",
        "photo of a <new3> rocket",
    ]
    dm.setup()
    assert [len(dm.train_dataset(t)) for t in range(3)] == [8, 8, 8]
    assert [len(dm.eval_dataset(t)) for t in range(3)] == [2, 2, 2]
    assert dm.eval_dataset(2)[0]["reference"].shape == (4, 3, 32, 32)

    def digest(root: Path) -> dict[str, str]:
        return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest() for p in root.rglob("*.*")}

    first, second = digest(write_embedded_concepts(tmp_path / "a")), digest(write_embedded_concepts(tmp_path / "b"))
    assert first == second and len(first) == 3 * 5 + 3 + 3 * 4  # images + captions, prompts, reg


def test_embedded_digits(tmp_path):
    """The digit concepts: one class word for all three, each concept's views the same digit in the same
    colours (pixel values of a painted digit are the two colours' blend), held-out instances, deterministic."""
    from datamodules import small_world as world
    from datamodules.concepts import _EMBEDDED_DIGITS

    dm = ConceptDataModule(embedded="digits", resolution=32, mask_downsample=2, clip_resolution=32)
    stream = dm.stream
    assert stream.tokens == ("<new1>", "<new2>", "<new3>")
    assert stream.classes == ("handwritten digit",) * 3
    assert stream.gate_prompts[0] == "photo of a <new1> handwritten digit"
    dm.setup()
    assert [len(dm.eval_dataset(t)) for t in range(3)] == [1, 1, 1]
    root = write_embedded_digit_concepts(tmp_path / "a")
    test_x, test_y = world.digits_split("test")
    for name, digit, ink, background in _EMBEDDED_DIGITS:
        views = sorted((root / name).glob("*.png"))
        assert len(views) == 4
        assert (root / name / "caption.txt").read_text().splitlines() == ["<new1> handwritten digit"] * 4
        first = torch.from_numpy(np.array(Image.open(views[0]))).permute(2, 0, 1).float() / 255
        k = int((test_y == digit).nonzero()[0])  # the first held-out instance of the digit
        assert torch.allclose(first, world.paint(test_x[k], ink, background), atol=1 / 255)
    assert len(list((root / "reg" / "handwritten digit").glob("*.png"))) == 8

    def digest(root: Path) -> dict[str, str]:
        return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest() for p in root.rglob("*.*")}

    assert digest(root) == digest(write_embedded_digit_concepts(tmp_path / "b"))
    with pytest.raises(ConfigError, match=r"data.embedded: 'faces' is not one of 'photos', 'digits'"):
        ConceptDataModule(embedded="faces")


def test_config_errors(concepts, tmp_path):
    with pytest.raises(ConfigError, match=r"data.root: .*nowhere not found"):
        module(tmp_path / "nowhere")
    with pytest.raises(
        ConfigError,
        match=r"elsewhere/dog: no regularisation images .*lifelong make-reg -c <config>.*"
        r"data.prior_preservation false",
    ):
        module(concepts, concepts=["dog1"], reg_root=str(concepts / "elsewhere"))
    for p in (concepts / "reg" / "cat").iterdir():
        p.unlink()
    with pytest.raises(ConfigError, match=r"reg/cat: no regularisation images of class 'cat'; generate them"):
        module(concepts)
    module(concepts, prior_preservation=False)
    with pytest.raises(ConfigError, match=r"data.resolution"):
        module(concepts, resolution=60)
    for option in ("augment_caption", "resize", "inference_gate"):
        with pytest.raises(ConfigError, match=rf"data.{option}: 'bogus' is not one of"):
            module(concepts, prior_preservation=False, **{option: "bogus"})
    with pytest.raises(ConfigError, match=r"data.concepts: 'nothing' is not a folder"):
        module(concepts, concepts=["nothing"])
    (concepts / "cat" / "caption.txt").write_text("one caption\n")
    with pytest.raises(ConfigError, match=r"cat/caption.txt: 1 captions for 2 images"):
        module(concepts, prior_preservation=False)
    (concepts / "cat" / "caption.txt").write_text("a\nb\n")
    (concepts / "cat" / "img1.png").write_bytes(b"not a png")
    dm = module(concepts, prior_preservation=False)
    with pytest.raises(ConfigError, match=r"cat/img1.png: not a readable image"):
        dm.setup()
    for p in (concepts / "cat").glob("*.png"):
        p.unlink()
    with pytest.raises(ConfigError, match=r"cat: no images"):
        module(concepts, prior_preservation=False)
