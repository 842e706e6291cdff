"""The small pretrained bases: build time, parameters, load time and the quality bars, in one run.

    python benchmarks/bases.py [--cache DIR] [--seed 0] [--samples_per_digit 10]

Builds the four bases with `lifelong pretrain-bases`' code into `--cache` (default: a fresh temporary
folder, removed at the end, so every model is built and timed; an existing cache is reused and its build
times come from its markers), loads each with the stock tool of its kind (diffusers pipelines, transformers' CLIPModel,
huggingface_hub's mixin), and measures the bars on held-out data:

- text-to-image: the digit classifier reads >= 80% of "a handwritten digit <d>" samples as d (25 DDIM steps,
  classifier-free guidance 5);
- CLIP: >= 80% of held-out coloured digits retrieve their caption among the ten digit captions;
- inpainting: PSNR inside the mask above a mean fill, PSNR outside the mask >= 30 dB after decoding (25 steps,
  no classifier-free guidance; the JSON also holds the digits and photos apart, and the figures at CFG 5).

Budget: all four built in <= 15 minutes and each loaded in < 2 s on 2 CPU cores. Prints a table, writes
`benchmarks/out/bases.json` and a sample grid `benchmarks/out/bases_samples.png`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BUDGET_BUILD_S = 15 * 60
BUDGET_LOAD_S = 2.0
BARS = {"digit_sample_accuracy": 0.8, "clip_digit_retrieval": 0.8, "psnr_outside_db": 30.0}


def _timed(load):
    start = time.perf_counter()
    out = load()
    return out, time.perf_counter() - start


def _grid(images: torch.Tensor, rows: int, path: Path) -> None:
    from PIL import Image

    n, c, h, w = images.shape
    cols = n // rows
    g = (images[: rows * cols].clamp(0, 1) * 255).byte().view(rows, cols, c, h, w).permute(0, 3, 1, 4, 2)
    Image.fromarray(g.reshape(rows * h, cols * w, c).numpy()).resize((cols * w * 2, rows * h * 2), 0).save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default=None, help="cache folder (default: a fresh temporary one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples_per_digit", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory(prefix="lifelong-bases-") as scratch:  # removed at the end
        _measure(args, args.cache or scratch, kept=args.cache is not None)


def _measure(args: argparse.Namespace, root: str, kept: bool) -> None:
    """Builds (or reuses) the bases under `root`, times their loads, checks their quality and writes the
    table and JSON; `kept`: the cache outlives the run, so the JSON names its folders."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLInpaintPipeline

    from lightning_modules.nn.bases import cache, quality
    from lightning_modules.nn.bases.classifier import DigitClassifier

    report = cache.build_bases(cache.MODELS, root=root, seed=args.seed)
    rows = {}
    for name in cache.MODELS:
        marker = json.loads((Path(report[name]["path"]) / cache.MARKER).read_text())
        rows[name] = {"build_s": marker["seconds"], "parameters": marker["parameters"], "path": report[name]["path"]}
    folder = {n: Path(r["path"]) for n, r in rows.items()}

    classifier, rows["digit-classifier"]["load_s"] = _timed(
        lambda: DigitClassifier.from_pretrained(folder["digit-classifier"], local_files_only=True).eval()
    )
    (clip, tokenizer), rows["clip"]["load_s"] = _timed(lambda: cache.load_clip_folder(folder["clip"]))
    _, rows["text-to-image"]["load_s"] = _timed(
        lambda: StableDiffusionPipeline.from_pretrained(folder["text-to-image"], local_files_only=True)
    )
    _, rows["inpainting"]["load_s"] = _timed(
        lambda: StableDiffusionXLInpaintPipeline.from_pretrained(folder["inpainting"], local_files_only=True)
    )

    from datamodules import small_world as world

    held = world.held_out_digits()
    quality_rows = {
        "classifier_held_out_accuracy": (classifier.predict((held["pixel_values"] + 1) / 2) == held["label"])
        .float()
        .mean()
        .item(),
        "clip_digit_retrieval": quality.clip_digit_retrieval(clip, tokenizer),
    }
    start = time.perf_counter()
    samples = quality.digit_sample_accuracy(folder["text-to-image"], classifier, per_digit=args.samples_per_digit)
    quality_rows["digit_sample_accuracy"] = samples["accuracy"]
    quality_rows["digit_sample_accuracy_per_digit"] = samples["per_digit"]
    quality_rows["sampling_s"] = time.perf_counter() - start
    inpaint = quality.inpainting_psnr(folder["inpainting"])
    quality_rows |= {f"{k}_db": v for k, v in inpaint.items() if k.startswith("psnr")}
    guided = quality.inpainting_psnr(folder["inpainting"], guidance_scale=5.0)  # for comparison, not a bar
    quality_rows |= {f"{k}_cfg5_db": v for k, v in guided.items() if k.startswith("psnr")}
    out = ROOT / "benchmarks/out"
    out.mkdir(parents=True, exist_ok=True)
    per = args.samples_per_digit
    picks = samples["images"].view(10, per, *samples["images"].shape[1:])[:, : min(per, 8)].transpose(0, 1)
    _grid(picks.reshape(-1, *samples["images"].shape[1:]), min(per, 8), out / "bases_samples.png")
    n = 8
    _grid(
        torch.cat([inpaint["images"][:n] * (1 - inpaint["masks"][:n]), inpaint["filled"][:n], inpaint["images"][:n]]),
        3,
        out / "bases_inpainting.png",
    )

    total_build = sum(r["build_s"] for r in rows.values())
    print(f"{'model':<17} {'build s':>8} {'load s':>7} {'parameters':>11}")
    for name, r in rows.items():
        print(f"{name:<17} {r['build_s']:>8.1f} {r['load_s']:>7.2f} {sum(r['parameters'].values()):>11,}")
    print(f"{'all four':<17} {total_build:>8.1f}   budget {BUDGET_BUILD_S} s build, {BUDGET_LOAD_S} s load each")
    q = quality_rows
    checks = [
        (
            "text-to-image: samples read as the prompted digit",
            q["digit_sample_accuracy"],
            ">= 0.80",
            q["digit_sample_accuracy"] >= 0.8,
        ),
        (
            "CLIP: held-out digits retrieve their caption",
            q["clip_digit_retrieval"],
            ">= 0.80",
            q["clip_digit_retrieval"] >= 0.8,
        ),
        (
            "inpainting: PSNR inside the mask (dB)",
            q["psnr_inside_db"],
            f"> mean fill {q['psnr_inside_mean_fill_db']:.2f}",
            q["psnr_inside_db"] > q["psnr_inside_mean_fill_db"],
        ),
        ("inpainting: PSNR outside the mask (dB)", q["psnr_outside_db"], ">= 30", q["psnr_outside_db"] >= 30),
        ("digit classifier: held-out accuracy", q["classifier_held_out_accuracy"], "(judge)", True),
        ("build time, all four (s)", total_build, f"<= {BUDGET_BUILD_S}", total_build <= BUDGET_BUILD_S),
        (
            "slowest load (s)",
            max(r["load_s"] for r in rows.values()),
            f"< {BUDGET_LOAD_S}",
            max(r["load_s"] for r in rows.values()) < BUDGET_LOAD_S,
        ),
    ]
    for label, value, bar, ok in checks:
        print(f"{label:<52} {value:>8.3f}  {bar:<18} {'met' if ok else 'NOT MET'}")
    if not kept:
        for r in rows.values():
            r["path"] = None  # a temporary folder, removed when the run ends
    result = {
        "seed": args.seed,
        "threads": torch.get_num_threads(),
        "models": rows,
        "quality": quality_rows,
        "checks": {label: {"value": value, "bar": bar, "met": bool(ok)} for label, value, bar, ok in checks},
    }
    (out / "bases.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
