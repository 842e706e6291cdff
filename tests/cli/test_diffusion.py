"""The text-to-image family end to end on the tiny preset and the embedded concepts: fit, the metric
matrix, delta-only checkpoints, resume, export and reload, sampling, composition and make-reg."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers")

from cli.diffusion import build, export, load_weights, make_reg, sample  # noqa: E402
from tests.conftest import config, read_reports  # noqa: E402

R2MOE = "diffusion/r2moe_concepts_tiny.yaml"
FAST = (
    "--task_switch.steps_per_task",
    "3",
    "--model.init_args.eval_samples_per_prompt",
    "1",
    "--model.init_args.eval_inference_steps",
    "2",
    "--data.init_args.max_eval_prompts",
    "1",
)
TWO = ("--data.init_args.concepts", "[cat, cup]")


@pytest.fixture(scope="module")
def r2moe_run(tmp_path_factory):
    """One short R2MoE fit over the three embedded concepts, shared by the tests that read it."""
    from cli.main import LifelongCLI
    from tests.conftest import fit_args

    root = tmp_path_factory.mktemp("r2moe")
    cli = LifelongCLI(args=fit_args(R2MOE, root, *FAST, "--trainer.log_every_n_steps", "1"))
    return cli, root


def test_r2moe_fit_fills_the_concept_matrix(r2moe_run):
    cli, root = r2moe_run
    (report,) = read_reports(root)
    assert report["metric"] == "clip_i" and report["tasks"] == ["cat", "cup", "rocket"]
    assert set(report["metrics"]) == {"clip_i", "clip_t", "dino_i"}  # the tiny config sets dino_model: tiny
    assert all(v is not None for row in report["metrics"]["dino_i"]["matrix"] for v in row)
    assert all(v is not None for row in report["matrix"] for v in row)
    assert report["summary"]["forgetting"] is not None
    model = cli.model
    assert model.finished_tasks() == 3 and all(0 <= k <= 12 for k in model.kept_experts.tolist())
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = list(root.glob("lightning_logs/version_0/events.*"))
    tags = EventAccumulator(str(events)).Reload().Tags()
    assert {"samples/cat", "samples/cup", "samples/rocket"} <= set(tags["images"])
    assert "train/routing_distillation" in tags["scalars"] and "eval/clip_i/task_0" in tags["scalars"]
    # old concepts' rows of the routing-distillation memory are their gate prompts' router inputs
    torch.testing.assert_close(model.gate_memory[0], model.gate_input([model.stream.gate_prompts[0]]))


def test_only_the_last_concepts_parameters_train_at_the_end(r2moe_run):
    model = r2moe_run[0].model
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in model.task_parameters(2)}
    assert not any(p.requires_grad for p in model.parts.unet.conv_in.parameters())


def test_checkpoint_holds_the_delta_only(r2moe_run):
    _, root = r2moe_run
    checkpoint = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    keys = checkpoint["state_dict"].keys()
    assert keys and all(
        ".lora_" in k
        or k.endswith((".route", ".route_frozen"))
        or ".alive" in k
        or "concept_tokens.rows" in k
        or k in ("gate_memory", "kept_experts")
        for k in keys
    )
    assert sum(v.numel() for v in checkpoint["state_dict"].values()) < 40_000  # the tiny UNet alone: 1.4 M
    # removed layer-experts are not stored, and come back as zero from their alive flags
    model = r2moe_run[0].model
    dead = [
        (n, t)
        for n, layer in zip(model.experts.names, model.experts.layers, strict=True)
        for t in range(3)
        if not layer.alive[t + 1]
    ]
    assert dead and not any(f"parts.unet.{n}.lora_down.{t}" in keys for n, t in dead)
    fresh, *_ = build([config(R2MOE)])
    load_weights(fresh, str(root / "checkpoints" / "last.ckpt"), None)
    for n, t in dead:
        assert torch.all(fresh.parts.unet.get_submodule(n).lora_down[t] == 0)


def test_exported_delta_reloads_to_identical_outputs(r2moe_run, tmp_path, capsys):
    _, root = r2moe_run
    ckpt, delta = str(root / "checkpoints" / "last.ckpt"), str(tmp_path / "delta.safetensors")
    export(["-c", config("trainer/cpu.yaml"), "-c", config(R2MOE), "--ckpt_path", ckpt, "--out", delta])
    assert "wrote" in capsys.readouterr().out
    from safetensors import safe_open

    with safe_open(delta, "pt") as f:
        assert json.loads(f.metadata()["concepts"]) == ["cat", "cup", "rocket"]
        names = list(f.keys())
    assert not any("base_layer" in n or "conv" in n for n in names)
    from_ckpt, *_ = build([config(R2MOE)])
    load_weights(from_ckpt, ckpt, None)
    from_delta, *_ = build([config(R2MOE)])
    load_weights(from_delta, None, delta)
    for k in range(3):
        gate = [from_ckpt.stream.gate_prompts[k]]
        a = from_ckpt.generate(["a <new1> cat on a beach"], gate, seed=3, num_inference_steps=2)
        b = from_delta.generate(["a <new1> cat on a beach"], gate, seed=3, num_inference_steps=2)
        assert torch.equal(a, b)
    dead = (from_delta.kept_experts < 12).any()
    if dead:  # removed experts are not stored, and reload as zeros
        layer = next(la for la in from_delta.experts.layers if not bool(la.alive[1:].all()))
        t = int((~layer.alive[1:]).nonzero()[0])
        assert torch.all(layer.lora_up[t] == 0) and torch.all(layer.lora_down[t] == 0)


def test_sample_and_compose_write_pngs(r2moe_run, tmp_path):
    from PIL import Image

    _, root = r2moe_run
    ckpt = str(root / "checkpoints" / "last.ckpt")
    common = ["-c", config(R2MOE), "--ckpt_path", ckpt, "--num_images", "2", "--steps", "2"]
    sample([*common, "--prompt", "{} on a beach", "--concept", "cup", "--out", str(tmp_path / "one")])
    pngs = sorted((tmp_path / "one").glob("*.png"))
    assert len(pngs) == 2 and Image.open(pngs[0]).size == (64, 64)
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == ["prompt00_00.png", "prompt00_01.png"]  # no .tmp
    for i, box in enumerate(((0, 32), (32, 64))):
        mask = torch.zeros(64, 64, dtype=torch.uint8)
        mask[:, box[0] : box[1]] = 255
        Image.fromarray(mask.numpy()).save(tmp_path / f"m{i}.png")
    sample(
        [
            *common,
            "--concept",
            "cat",
            "--concept",
            "cup",
            "--prompt",
            "{} on the left",
            "--prompt",
            "{} on the right",
            "--mask",
            str(tmp_path / "m0.png"),
            "--mask",
            str(tmp_path / "m1.png"),
            "--background",
            "a kitchen",
            "--out",
            str(tmp_path / "two"),
        ]
    )
    assert len(list((tmp_path / "two").glob("composition_*.png"))) == 2


@pytest.mark.parametrize(
    ("inference_gate", "cup", "cat"),
    [
        ("token_class", "photo of a <new2> cup", "photo of a <new1> cat"),  # the released sampling script
        (
            "caption",
            "photo of a <new2> cup, espresso on a saucer on a wooden table",
            "photo of a <new1> cat, close-up of the face",
        ),
    ],
)
def test_sample_routes_by_the_inference_gate_prompt(r2moe_run, tmp_path, monkeypatch, inference_gate, cup, cat):
    """`lifelong sample` (one concept, and composed) routes by `data.inference_gate`'s prompt."""
    from PIL import Image

    from lightning_modules.diffusion import R2MoE

    seen = []

    def generate(self, prompts, gate_prompts=None, **kwargs):
        seen.append(list(gate_prompts))
        return torch.zeros(len(prompts), 3, 8, 8)

    def compose(self, regions, gate_prompts, masks, background, num_images, **kwargs):
        seen.append(list(gate_prompts))
        return torch.zeros(num_images, 3, 8, 8)

    monkeypatch.setattr(R2MoE, "generate", generate)
    monkeypatch.setattr(R2MoE, "compose", compose)
    ckpt = str(r2moe_run[1] / "checkpoints" / "last.ckpt")
    common = ["-c", config(R2MOE), "--ckpt_path", ckpt, "--num_images", "1"]
    common += ["--set=--data.init_args.inference_gate", f"--set={inference_gate}"]
    sample([*common, "--prompt", "{} on a beach", "--concept", "cup", "--out", str(tmp_path / "one")])
    Image.fromarray(torch.full((64, 64), 255, dtype=torch.uint8).numpy()).save(tmp_path / "m.png")
    composed = ["--concept", "cup", "--concept", "cat", "--prompt", "{}", "--prompt", "{}"]
    composed += ["--mask", str(tmp_path / "m.png"), "--mask", str(tmp_path / "m.png")]
    sample([*common, *composed, "--out", str(tmp_path / "two")])
    assert seen == [[cup], [cup, cat]]


def test_sample_errors_are_one_line(r2moe_run, tmp_path, capsys):
    _, root = r2moe_run
    with pytest.raises(SystemExit):
        sample(
            [
                "-c",
                config(R2MOE),
                "--prompt",
                "x",
                "--out",
                str(tmp_path),
                "--concept",
                "dog",
                "--ckpt_path",
                str(root / "checkpoints" / "last.ckpt"),
            ]
        )
    assert capsys.readouterr().err.strip() == "lifelong: error: --concept 'dog' is not one of ['cat', 'cup', 'rocket']"
    with pytest.raises(SystemExit):
        sample(["-c", config(R2MOE), "--prompt", "x", "--out", str(tmp_path), "--delta", str(tmp_path / "no.st")])
    assert capsys.readouterr().err.count("\n") == 1


def test_r2moe_resumes_to_the_uninterrupted_delta(run_fit, tmp_path):
    run_fit(R2MOE, tmp_path / "full", *FAST, *TWO)
    run_fit(R2MOE, tmp_path / "cut", *FAST, *TWO, "--task_switch.stop_after_task", "1")
    resumed = run_fit(R2MOE, tmp_path / "cut", *FAST, *TWO, "--ckpt_path", "last")
    full = torch.load(tmp_path / "full" / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    for k, v in resumed.model.delta_state_dict().items():
        torch.testing.assert_close(v, full["state_dict"][k], rtol=0, atol=1e-6, msg=k)
    a, b = read_reports(tmp_path / "full")[-1], read_reports(tmp_path / "cut")[-1]
    for row_a, row_b in zip(a["matrix"], b["matrix"], strict=True):
        assert row_a == pytest.approx(row_b, abs=1e-4)


def test_routing_distillation_keeps_the_first_concepts_routing(run_fit, tmp_path, monkeypatch):
    """After learning concept 2, concept 1's gate prompt is routed as before up to the distillation
    slack sum ||u_1 R_2||: with the distillation term that slack is far smaller than without it."""
    from lightning_modules.nn.diffusion.experts import MoELoRALinear

    folded = []  # each layer's router increment R_t as the end of its task adds it to the frozen routers
    fold = MoELoRALinear.fold_router
    monkeypatch.setattr(MoELoRALinear, "fold_router", lambda layer: (folded.append(layer.route.clone()), fold(layer)))
    fast_router = ("--model.init_args.router_lr", "0.05", "--task_switch.steps_per_task", "6")
    slack = {}
    for weight in ("0.0", "10.0"):
        folded.clear()
        cli = run_fit(
            R2MOE, tmp_path / weight, *FAST, *TWO, *fast_router, "--model.init_args.distillation_weight", weight
        )
        model = cli.model
        u = model.gate_memory[:1]
        layers = len(model.experts.layers)
        assert len(folded) == 2 * layers
        slack[weight] = float(sum(torch.linalg.matrix_norm(u @ r) for r in folded[layers:]))
    assert slack["0.0"] > 0 and slack["10.0"] < 0.5 * slack["0.0"]


@pytest.mark.parametrize("method", ["custom_diffusion", "sequential_lora"])
def test_baselines_train_only_their_weights(run_fit, tmp_path, method):
    cli = run_fit(f"diffusion/{method}_concepts_tiny.yaml", tmp_path, *FAST, *TWO)
    model = cli.model
    (report,) = read_reports(tmp_path)
    assert all(v is not None for row in report["matrix"] for v in row)
    delta = model.delta_state_dict()
    fresh, *_ = build([config(f"diffusion/{method}_concepts_tiny.yaml")], list(TWO))
    moved = [k for k, v in delta.items() if not torch.equal(v, fresh.state_dict()[k])]
    assert moved and all(k in delta for k in moved)
    frozen = "parts.unet.conv_in.weight"
    assert torch.equal(model.state_dict()[frozen], fresh.state_dict()[frozen])
    if method == "custom_diffusion":
        assert sum(".attn2.to_k" in k or ".attn2.to_v" in k for k in moved) == 12
    else:
        assert any(".lora_B." in k for k in moved)


def test_make_reg_writes_images_per_class(tmp_path):
    from datamodules.concepts import write_embedded_concepts

    root = write_embedded_concepts(tmp_path / "concepts")
    args = [
        "-c",
        config(R2MOE),
        "--set=--data.init_args.root",
        f"--set={root}",
        "--set=--data.init_args.reg_root",
        f"--set={tmp_path / 'reg'}",
        "--num_images",
        "2",
        "--steps",
        "2",
    ]
    make_reg(args)
    for cls in ("cat", "cup", "rocket"):
        assert len(list((tmp_path / "reg" / cls).glob("*.png"))) == 2


def test_real_configs_name_what_is_missing_in_one_line(capsys):
    from cli.main import main

    sd15 = ["fit", "-c", config("diffusion/r2moe_customconcept101_sd15.yaml"), "--trainer.accelerator", "cpu"]
    with pytest.raises(SystemExit):
        main(sd15)
    assert capsys.readouterr().err.splitlines()[-1] == (
        "lifelong: error: data.root: data/customconcept101 not found; point it at a folder of <concept>/ image folders"
    )
    with pytest.raises(SystemExit):
        main([*sd15, "--data.init_args.root", "null", "--data.init_args.concepts", "null"])
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith(
        "lifelong: error: model.pretrained_model_name_or_path: 'models/stable-diffusion-v1-5' is not"
    )


def _export(ckpt, out) -> None:
    export(["-c", config("trainer/cpu.yaml"), "-c", config(R2MOE), "--ckpt_path", str(ckpt), "--out", str(out)])


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lifelong: error: "), err
    return err.strip().removeprefix("lifelong: error: ")


def test_export_refuses_what_is_not_a_regular_file(r2moe_run, tmp_path, capsys):
    import os
    import stat

    ckpt = r2moe_run[1] / "checkpoints" / "last.ckpt"
    folder = tmp_path / "exports"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    for out in (folder, "/dev/null", fifo):
        before = os.stat(out)
        with pytest.raises(SystemExit) as stop:
            _export(ckpt, out)
        assert stop.value.code == 2
        assert _one_line_error(capsys) == f"--out {out}: exists and is not a regular file; choose a new file name"
        after = os.stat(out)
        assert (after.st_ino, after.st_mode, after.st_rdev) == (before.st_ino, before.st_mode, before.st_rdev)
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode) and stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert os.listdir(folder) == ["keep.txt"] and (folder / "keep.txt").read_text() == "mine"
    assert sorted(os.listdir(tmp_path)) == ["exports", "pipe"]  # no temporary file beside them either


def test_a_failed_export_leaves_the_previous_one(r2moe_run, tmp_path, capsys, monkeypatch):
    import errno
    import os

    import safetensors.torch

    ckpt = r2moe_run[1] / "checkpoints" / "last.ckpt"
    out = tmp_path / "delta.safetensors"
    _export(ckpt, out)
    before = out.read_bytes(), out.stat().st_mtime_ns
    capsys.readouterr()

    def half_then(error):
        def save_file(tensors, filename, metadata=None):
            with open(filename, "wb") as f:
                f.write(before[0][: len(before[0]) // 2])
            raise error

        return save_file

    monkeypatch.setattr(safetensors.torch, "save_file", half_then(OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(SystemExit) as stop:
        _export(ckpt, out)
    assert stop.value.code == 2
    message = _one_line_error(capsys)
    assert message.startswith(f"--out {out}: could not be written (No space left on device)")
    assert "unchanged" in message
    monkeypatch.setattr(safetensors.torch, "save_file", half_then(RuntimeError("killed mid-write")))
    with pytest.raises(RuntimeError, match="killed mid-write"):
        _export(ckpt, out)
    assert (out.read_bytes(), out.stat().st_mtime_ns) == before
    assert os.listdir(tmp_path) == [out.name]  # the half-written temporary files are gone


def test_missing_options_are_one_line(tmp_path, capsys):
    common = ["-c", config(R2MOE)]
    for argv, expected in (
        ([*common, "--ckpt_path", "last.ckpt"], "--out missing: see lifelong export --help"),
        ([*common, "--out", str(tmp_path / "d.safetensors")], "--ckpt_path missing: see lifelong export --help"),
        (common, "--ckpt_path and --out missing: see lifelong export --help"),
        (["--ckpt_path", "x", "--out", "y"], "--config missing: see lifelong export --help"),
    ):
        with pytest.raises(SystemExit) as stop:
            export(argv)
        assert stop.value.code == 2 and _one_line_error(capsys) == expected
    with pytest.raises(SystemExit):
        sample([*common, "--prompt", "x", "--delta", "d.safetensors"])
    assert _one_line_error(capsys) == "--out missing: see lifelong sample --help"
    with pytest.raises(SystemExit):
        export([*common, "--ckpt_path", "x", "--out", "y", "--set"])
    assert _one_line_error(capsys) == "argument --set: expected one argument"
    assert list(tmp_path.iterdir()) == []


def test_sample_out_must_be_a_folder(tmp_path, capsys):
    mine = tmp_path / "notes.txt"
    mine.write_text("mine")
    with pytest.raises(SystemExit) as stop:
        sample(["-c", config(R2MOE), "--prompt", "x", "--delta", "d.safetensors", "--out", str(mine)])
    assert stop.value.code == 2
    assert _one_line_error(capsys) == f"--out {mine}: {mine} is not a folder; choose a folder for the files"
    assert mine.read_text() == "mine"


def test_export_format_diffusers_writes_a_folder_of_loadable_files(r2moe_run, tmp_path, capsys):
    """The CLI path of `--format diffusers` (what the files load to: tests/lightning_modules/test_diffusers_export)."""
    ckpt = str(r2moe_run[1] / "checkpoints" / "last.ckpt")
    args = ["-c", config("trainer/cpu.yaml"), "-c", config(R2MOE), "--ckpt_path", ckpt, "--format", "diffusers"]
    mine = tmp_path / "notes.txt"
    mine.write_text("mine")
    with pytest.raises(SystemExit) as stop:
        export([*args, "--out", str(mine)])
    assert stop.value.code == 2
    assert _one_line_error(capsys) == f"--out {mine}: {mine} is not a folder; choose a folder for the files"
    out = tmp_path / "diffusers"
    export([*args, "--out", str(out)])
    assert "export.json" in capsys.readouterr().out
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["method"] == "R2MoE" and [c["name"] for c in manifest["concepts"]] == ["cat", "cup", "rocket"]
    assert sorted(p.name for p in out.iterdir()) == sorted([*manifest["files"], "export.json"])  # no temporaries
    for concept in manifest["concepts"]:
        assert concept["token_file"] in manifest["files"]
        assert concept["lora"] is None or concept["lora"] == f"{concept['name']}.safetensors"
    assert any(line.startswith("pipe.load_lora_weights(") for line in manifest["load"])
