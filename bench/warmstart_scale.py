"""Does the vision tower learn which animal it sees, given far more images than a CPU build can show it?

The default model's warm start (``models.warmstart``, 1,500 steps × 32 images on 2 CPU cores, 16 min) teaches the
tower where the animal is; with the category objective added it learnt no categories in 300-1,500 steps
(models/build.py has the figures), and category accuracy stays near chance after SFT and RL (issue #9). This
benchmark runs the same warm start for many more steps, on a GPU where one is visible (images rendered by DataLoader
workers), and reads the held-out diagnostics on the way: is the category a matter of compute, or of what 112-px
images at 14-px patches let this tower see?

Prints ONE JSON object: the held-out curve (objectness hit, image category accuracy from the tokens pooled over the
animal's true cells, presence AUC) every ``--log-every`` steps, and ``at_cpu_budget`` (the reading at the CPU
recipe's 1,500 steps: the baseline measured in the same run) beside ``at_end``.

    python -m bench.warmstart_scale [--steps 20000] [--category-weight 1.0] [--category-start 0.0] [--workers 12]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

if not __package__:  # run as a script: do not let bench/ shadow the top-level packages
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

log = logging.getLogger("bench.warmstart_scale")

CPU_RECIPE_STEPS = 1500  # RECIPES["small"].warm_start.steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20000)
    parser.add_argument("--batch-images", type=int, default=32)
    parser.add_argument("--category-weight", type=float, default=1.0)
    parser.add_argument("--category-start", type=float, default=0.0, help="share of steps before the category losses")
    parser.add_argument("--box-weight", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--image-size", type=int, default=112, help="rendered side; the processor shows it as is")
    parser.add_argument("--workers", type=int, default=12, help="DataLoader workers rendering images")
    parser.add_argument("--log-every", type=int, default=500)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--out", help="also write the JSON here")
    parser.add_argument("--save", help="keep the warm-started model in this directory (a model directory that "
                        "bench.box_probe and bench.tower_probe read)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import torch
    from transformers import AutoImageProcessor, AutoModelForImageTextToText

    from data.synth import CATEGORIES
    from models.build import BUILD_INFO_FILE, RECIPES, WARM_START_FILE, build_info, build_model
    from models.warmstart import (WS_HELD_CATEGORY, WS_HELD_HIT, WS_HELD_HIT_CHANCE, WS_HELD_PRESENCE_AUC,
                                  WarmStartConfig, warm_start_vision)

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    # The small model as the builder makes it, without its warm start (run here instead), showing every image at
    # --image-size.
    pixels = args.image_size * args.image_size
    recipe = RECIPES["small"].model_copy(update={"min_pixels": pixels, "max_pixels": pixels, "warm_start": None})
    with tempfile.TemporaryDirectory() as work:
        model_dir = build_model(size="small", out_dir=Path(args.save or Path(work) / "small"), recipe=recipe)
        model = AutoModelForImageTextToText.from_pretrained(model_dir)
        image_processor = AutoImageProcessor.from_pretrained(model_dir, backend="pil")
    model.model.visual.to(device)
    config = WarmStartConfig(steps=args.steps, batch_images=args.batch_images, lr=args.lr, box_weight=args.box_weight,
                             category_weight=args.category_weight, category_start_fraction=args.category_start,
                             image_size=args.image_size, loader_workers=args.workers, log_every=args.log_every,
                             bf16=args.bf16)
    curve: list[dict] = []

    def progress(step: int, losses: dict[str, float]) -> None:
        if WS_HELD_CATEGORY in losses:
            curve.append({"step": step + 1, "wall_s": round(time.perf_counter() - start, 1),
                          "objectness_hit": round(losses[WS_HELD_HIT], 3),
                          "objectness_hit_chance": round(losses[WS_HELD_HIT_CHANCE], 3),
                          "category_accuracy": round(losses[WS_HELD_CATEGORY], 3),
                          "presence_auc": round(losses[WS_HELD_PRESENCE_AUC], 3)})

    start = time.perf_counter()
    diagnostics = warm_start_vision(model, image_processor=image_processor, config=config, progress=progress)
    wall = time.perf_counter() - start
    if args.save:  # the build's tokenizer and processor files are there; the weights and the record are replaced
        save = Path(args.save)
        model.to("cpu").save_pretrained(save)
        (save / WARM_START_FILE).write_text(json.dumps(diagnostics, indent=2))
        ran = recipe.model_copy(update={"warm_start": config})  # the build recorded no warm start
        (save / BUILD_INFO_FILE).write_text(json.dumps(build_info(size="small", seed=0, recipe=ran), indent=2))
    at_cpu = min(curve, key=lambda point: abs(point["step"] - CPU_RECIPE_STEPS))
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "config": config.model_dump(mode="json"), "wall_s": round(wall, 1),
              "s_per_step": round(wall / args.steps, 4), "category_chance": round(1 / len(CATEGORIES), 3),
              "at_cpu_budget": at_cpu, "at_end": curve[-1], "curve": curve}
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
