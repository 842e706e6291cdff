"""Result table of object removal on the small pretrained inpainting base: the base model, RORem after one
round, and after three rounds with and without the data engine; D_phi's agreement with the ground truth; the
seconds per image of RORem's 50-step removal.

    python benchmarks/removal.py [--seeds 0 1] [--jobs 2] [--report]

Per seed, one process: `configs/removal/discriminator_pretrained.yaml`, then
`configs/removal/data_engine_pretrained.yaml` with that discriminator (`engine`), and the same three rounds
with the engine's inputs taken away (`control`: the ground-truth triplets only, the same steps). Round 0 is
evaluated on held-out digits (the kind the ground truth covers), rounds 1 and 2 on held-out photo patches
(the kind only the engine's removals bring). Then, in this process, the removal's seconds per image (50 and
25 steps, side by side). Prints the tables, writes `benchmarks/out/removal.json` and the committed
`docs/results/removal_tiny.md`.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import ROOT, fit_run, fmt, markdown_table, run_jobs, table_parser  # noqa: E402

METHODS = ["engine", "control"]
OUT = ROOT / "benchmarks/out/removal"
ENGINE = ROOT / "configs/removal/data_engine_pretrained.yaml"
DISCRIMINATOR = ROOT / "configs/removal/discriminator_pretrained.yaml"
#: the control: the engine's three rounds without inputs (nothing to remove, nothing accepted)
CONTROL_ROUNDS = (
    "--data.init_args.rounds=["
    "{name: initialization, train: embedded:digits-on-photos, eval: embedded:digits-on-photos},"
    "{name: automatic-1, eval: embedded:patches-on-photos},"
    "{name: automatic-2, eval: embedded:patches-on-photos}]"
)
METRICS = ["gt_success", "psnr_inside", "psnr_background", "ssim_background", "d_success", "clip_gt"]
#: what the committed table can and cannot show (written from the measured runs)
READING = [
    "**RORem's fine-tuning helps, a little, on both kinds.** 300 steps on 1,024 ground-truth triplets of digits",
    "raise the ground-truth success on held-out digits from 28.1% to 35.9% and on photo patches (never trained",
    "on) from 35.9% to 42.6%; PSNR inside the mask rises by 1.5 and 0.8 dB, the background's by 1.2 and 1.0 dB.",
    "",
    "**The data engine does not show a gain here.** After three rounds, the engine's model and the control",
    "(the same three rounds on the ground truth only) reach 37.5% on digits alike and 44.9 ± 1.7% against",
    "43.0 ± 4.4% on patches. With 64 held-out digits and 128 patches per seed, that is well within sampling",
    "noise. The engine's roughly 430 accepted removals sit beside 1,024 ground-truth triplets, and they cost",
    "a little background fidelity on patches (29.06 against 29.41 dB): the model learns from its own decodes,",
    "which carry the decoder's error at the mask's border. RORem's Table 1 grows its set 3x over its rounds;",
    "this run grows it 1.4x.",
    "",
    "**D_phi needs the human round.** Trained on the synthetic judged set alone, it calls 55-64% of the base",
    "model's removals good when the ground truth calls 28-36% good, and it barely moves with the model",
    "(the control's rows). Retrained on the 512 human-judged removals of round 0, it tracks the ground truth:",
    "on round 1's 512 unseen inputs it accepts 41.6% where the ground truth finds 43.1% good, agrees on",
    "86.4% of the images, and 85.4% of what it accepts is good. On the held-out sets, after round 0, its",
    "success rate is within 3 points of the ground truth's on both kinds (38.3 vs 35.9, 39.8 vs 42.6).",
    "RORem reports its discriminator within 3% of human rates. The `d_success` column therefore compares",
    "across rows only where the same D_phi scored: the base and control rows use the synthetic one, the",
    "engine's rows the retrained one.",
    "",
    "**What the table cannot show.**",
    "- The judge is a PSNR threshold against the ground truth, which rewards smooth fills. A mean-colour fill",
    "  of the mask scores 39.1% on these held-out digits and 48.4% on the patches, above every model here;",
    "  the small base's removals are about as close to the ground truth as a flat fill (PSNR inside 17.1 vs",
    "  16.8 dB on digits). The table measures the method's mechanics and relative changes on a 32 px, 8.5M",
    "  parameter base, not removal quality comparable to RORem's SDXL numbers.",
    "- Two seeds, 300 steps per round; the paper trains 50,000 steps per round on up to 200K triplets.",
    "- The seconds per image are CPU times at 32 px with another process on the machine; RORem reports",
    "  4.03 s per 512 px image on a GPU. 50 steps cost 2.5x 25 steps here, more than 2x: the pipeline's",
    "  fixed cost per call is spread over fewer steps at 25.",
]


def run_one(method: str, seed: int, out: str) -> None:
    """The discriminator, then the engine or the control run, in this process; writes their reports."""
    import shutil
    import tempfile

    import torch

    torch.set_num_threads(1)
    keep = Path(tempfile.mkdtemp())

    def save_checkpoint(cli, folder):
        shutil.copy(Path(folder) / "checkpoints" / "last.ckpt", keep / "discriminator.ckpt")

    _, d_report, d_wall, _ = fit_run(DISCRIMINATOR, seed, save_checkpoint)
    extra = [f"--model.init_args.discriminator={keep / 'discriminator.ckpt'}"]
    if method == "control":
        extra.append(CONTROL_ROUNDS)
    _, report, wall, _ = fit_run(ENGINE, seed, extra=extra)
    shutil.rmtree(keep)
    Path(out).write_text(
        json.dumps(
            {
                "metrics": report["metrics"],
                "untrained": {k: v["untrained"] for k, v in report["metrics"].items()},
                "data_engine": report.get("data_engine", {}),
                "discriminator": d_report["metrics"],
                "wall_s": wall,
                "discriminator_wall_s": d_wall,
            }
        )
    )


def removal_seconds(repeats: int = 3, images: int = 16) -> dict:
    """Seconds per image of RORem's removal on the small base at 50 and 25 steps (strength 0.99), interleaved,
    median of `repeats`, torch's default threads."""
    import torch

    from cli.diffusion import build
    from lightning_modules.removal import RORem

    model, dm, _ = build([str(ENGINE)], ["--model.init_args.discriminator=null"], RORem, "RORem")
    model.eval()
    batch = {k: v[:images] for k, v in _stack(dm.eval_dataset(0)).items()}
    times: dict[int, list[float]] = {50: [], 25: []}
    for k in range(repeats + 1):
        for steps in times:
            start = time.perf_counter()
            model.remove(batch["source"], batch["mask"], list(range(images)), num_inference_steps=steps)
            if k:
                times[steps].append((time.perf_counter() - start) / images)
    med = {s: statistics.median(v) for s, v in times.items()}
    return {"seconds_per_image": med, "ratio_50_over_25": med[50] / med[25], "threads": torch.get_num_threads()}


def _stack(dataset) -> dict:
    import torch

    items = [dataset[i] for i in range(len(dataset))]
    return {k: torch.stack([torch.as_tensor(it[k]) for it in items]) for k in ("source", "mask", "target")}


def rows_of(run: dict, metric: str) -> dict[str, tuple[float | None, float | None]]:
    """(digits, patches) of `metric` for the base, RORem after round 0, and after round 2 of this run."""
    mat, base = run["metrics"][metric]["matrix"], run["untrained"][metric]

    def split(row):
        return row[0], statistics.mean(row[1:])

    return {"base": split(base), "round 0": split(mat[0]), "round 2": split(mat[2])}


def build_table(runs: dict[str, list[dict]]) -> tuple[dict[str, dict[str, str]], list[str]]:
    """{row: {column: cell}} over the seeds, and the markdown lines."""
    rows = {
        "base inpainting model": ("engine", "base"),
        "RORem, 1 round (ground truth)": ("engine", "round 0"),
        "RORem, 3 rounds, ground truth only": ("control", "round 2"),
        "RORem, 3 rounds, data engine": ("engine", "round 2"),
    }
    table: dict[str, dict[str, str]] = {}
    for name, (method, when) in rows.items():
        cells = {}
        for metric in METRICS:
            for part, label in ((0, "digits"), (1, "patches")):
                vals = [rows_of(r, metric)[when][part] for r in runs.get(method, []) if metric in r["metrics"]]
                scale, digits = (100, 1) if "success" in metric else (1, 2 if "psnr" in metric else 3)
                cells[f"{metric} {label}"] = fmt(vals, scale, digits)
        table[name] = cells
    header = list(next(iter(table.values())))
    return table, markdown_table("model", header, {k: list(v.values()) for k, v in table.items()})


def engine_table(runs: list[dict]) -> list[str]:
    """Per round of the data engine: processed, accepted, precision, D_phi's agreement, mean over seeds."""
    names = list(runs[0]["data_engine"])
    keys = ["judge", "processed", "accepted", "acceptance_rate", "gt_success", "precision", "d_success", "d_agreement"]
    cells = {}
    for name in names:
        row = []
        for key in keys:
            vals = [r["data_engine"][name].get(key) for r in runs]
            scale = 1 if key in ("processed", "accepted") else 100
            row.append(str(vals[0]) if key == "judge" else fmt(vals, scale, 1))
        cells[name] = row
    return markdown_table("round", keys, cells)


def main() -> None:
    parser = table_parser(__doc__, METHODS, str(ROOT / "docs/results/removal_tiny.md"))
    parser.add_argument("--skip-timing", action="store_true")
    args = parser.parse_args()
    if args.one:
        method, seed, out = args.one
        run_one(method, int(seed), out)
        return
    from lightning_modules.nn.bases import cache

    cache.ensure("inpainting")  # build the bases once, before the runs start
    cache.ensure("clip")
    if not args.report:
        todo = [(m, s) for s in args.seeds for m in args.methods]
        run_jobs(__file__, todo, OUT, args.jobs)
    runs = {m: [json.loads((OUT / f"{m}_seed{s}.json").read_text()) for s in args.seeds] for m in args.methods}
    table, lines = build_table(runs)
    timing_path = OUT / "timing.json"
    if not args.skip_timing and not args.report:
        timing_path.write_text(json.dumps(removal_seconds()))
    timing = json.loads(timing_path.read_text()) if timing_path.exists() else None
    for name, cells in table.items():
        print(name, " | ".join(f"{k} {v}" for k, v in cells.items()))
    engine_lines = engine_table(runs["engine"]) if "engine" in runs else []
    print("\n".join(engine_lines))
    if timing:
        print("seconds per image:", timing)
    disc = [r["discriminator"]["accuracy"]["matrix"][0][0] for r in runs.get("engine", [])]
    walls = {m: statistics.mean(r["wall_s"] for r in rs) for m, rs in runs.items()}
    summary = {"table": table, "timing": timing, "discriminator_synthetic_accuracy": disc, "wall_s": walls}
    (ROOT / "benchmarks/out").mkdir(parents=True, exist_ok=True)
    (ROOT / "benchmarks/out/removal.json").write_text(json.dumps(summary, indent=2))
    seeds = ", ".join(str(s) for s in args.seeds)
    doc = [
        "# Object removal on the small pretrained inpainting base",
        "",
        f"`python benchmarks/removal.py --seeds {' '.join(str(s) for s in args.seeds)}` (seeds {seeds}; mean ± std",
        "over seeds). Base: the small SDXL-inpainting-class model built by `lifelong pretrain-bases`. Data: the",
        "embedded removal set at 32 px (`datamodules/removal.py`): ground-truth triplets of coloured digits pasted",
        "onto photo crops; new inputs of elliptic photo patches pasted onto photo crops; held-out images of each.",
        "Removal: RORem's released sampling (50 steps from the noised source at strength 0.99, no guidance).",
        "`gt_success`: PSNR inside the mask >= 20 dB against the ground truth (the stand-in for a human judge);",
        "`psnr_background` / `ssim_background`: against the source outside the mask grown by 2 px; `d_success`:",
        "D_phi's score >= 0.5; `clip_gt`: CLIP cosine of the removal to the ground truth (the small CLIP).",
        "",
        *lines,
        "",
        "The data engine, per round (percentages; `processed` and `accepted` are counts; the round-0 inputs are",
        "judged by the ground truth, later ones by D_phi; `precision`: the accepted share the ground truth calls",
        "good; `d_agreement`: D_phi's decision at 0.5 against the ground truth's, on that round's inputs):",
        "",
        *engine_lines,
        "",
    ]
    if timing:
        s = timing["seconds_per_image"]
        doc += [
            f"Seconds per image on 2 CPU cores ({timing['threads']} threads), batch of 16, median of 3: 50 steps "
            f"{float(s['50']):.3f} s, 25 steps {float(s['25']):.3f} s (ratio {timing['ratio_50_over_25']:.2f}).",
            "",
        ]
    doc += [
        f"Wall time per run (one thread each, two at a time): engine {walls.get('engine', 0):.0f} s, control "
        f"{walls.get('control', 0):.0f} s; the discriminator's fit comes before each.",
        "",
        "## Reading",
        "",
        *READING,
    ]
    path = Path(args.markdown)
    marker = "<!-- benchmarks/removal_rl.py writes below this line -->"
    tail = path.read_text().partition(marker) if path.exists() else ("", "", "")
    path.write_text("\n".join(doc) + "\n" + (f"\n{marker}{tail[2]}" if tail[1] else ""))  # keeps removal_rl.py's
    print(f"wrote {args.markdown}")


if __name__ == "__main__":
    main()
