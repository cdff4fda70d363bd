"""Does every InternVL stage stream? Peak memory of each stage of a whole run, in its own process, at two depths.

    PYTHONPATH=. python benchmarks/streaming_vlm.py [--depths 2,8] [--width 1024] [--ram-gb 0.7]

An InternVL folder is written per depth with `save_pretrained` (so its keys carry the old
`language_model.model.` prefixes): a random Qwen2 language model of the given width (4 heads, 2 KV heads,
MLP 2.75x) with D layers, a fixed 2-layer ViT (hidden 256) on 32 px images, a 320-token byte-level tokenizer.
Then `launch.py train --backend vlm --stages X` runs each stage in a fresh process (8 colour-square QA samples,
8 calibration samples, 2 training steps, ratio 0.45) and the process's peak resident memory (ru_maxrss of the
child) is recorded, with the run folder's size. A stage that streams shows about the same peak at both depths;
training holds the emulator, so it may grow by the emulator's own size. Prints a markdown table and writes
benchmarks/out/streaming_vlm.md.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.streaming import OUT, drive, peak_of, record_run  # noqa: E402  (the same probe and table as FLUX's)

STAGES = ("calibrate", "emulate", "train", "correct", "preview")
IMAGE_SIZE, PATCH, IMAGE_SEQ_LENGTH = 32, 8, 4  # (32/8)² patches, pixel shuffle 0.5 -> 4 image tokens
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30),
           "white": (250, 250, 250), "black": (5, 5, 5), "purple": (140, 30, 160), "orange": (250, 140, 20)}
QUESTION = "What colour is the square?"


def write_model(folder: Path, layers: int, width: int) -> int:
    """An InternVL folder with a `layers`-deep language model of `width`; returns its parameter count."""
    from pipelines.demo.offline_tokenizers import (internvl_chat_tokenizer, internvl_image_processor, save_internvl,
                                                   small_internvl)

    if folder.exists():
        shutil.rmtree(folder)
    tokenizer = internvl_chat_tokenizer([QUESTION + " " + " ".join(COLOURS)] * 4, vocab_size=320)
    intermediate = int(width * 2.75) // 64 * 64
    model = small_internvl(tokenizer, 0, text=(width, intermediate, layers), vision=(256, 1024, 2),
                           image_size=IMAGE_SIZE, patch=PATCH, max_positions=1024)
    save_internvl(model, tokenizer, internvl_image_processor(IMAGE_SIZE), folder, IMAGE_SEQ_LENGTH)
    return sum(p.numel() for p in model.parameters())


def write_data(folder: Path) -> Path:
    """8 solid-colour squares and their QA pairs as qa.csv; returns the csv."""
    from PIL import Image

    (folder / "images").mkdir(parents=True, exist_ok=True)
    with open(folder / "qa.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "question", "answer"])
        for name, rgb in COLOURS.items():
            Image.new("RGB", (40, 36), rgb).save(folder / "images" / f"{name}.png")
            writer.writerow([f"images/{name}.png", QUESTION, name])
    return folder / "qa.csv"


def measure(layers: int, width: int, work: Path, ram_gb: float) -> dict:
    model = work / f"internvl-{layers}"
    params = write_model(model, layers, width)
    data = work / "data" / "qa.csv"
    if not data.exists():
        write_data(data.parent)
    out = work / f"run-{layers}"
    shutil.rmtree(out, ignore_errors=True)
    base = [sys.executable, str(ROOT / "launch.py"), "train", "--backend", "vlm", "--model", str(model),
            "--data", str(data), "--out", str(out), "--steps", "2", "--calibration-samples", "8", "--ratio", "0.45",
            "--rank", "8", "--max-new-tokens", "4", "--preview-samples", "2", "--device", "cpu",
            "--ram-gb", str(ram_gb), "--quiet"]
    row = {"depth": layers, "params": params, "model_bytes": sum(f.stat().st_size for f in model.glob("*.safetensors")),
           "ram_gb": ram_gb}
    for stage in STAGES:
        peak, seconds = peak_of(base + (["--resume"] if stage != "calibrate" else []) + ["--stages", stage])
        row[stage], row[stage + "_seconds"] = peak, seconds
    return record_run(row, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", default="2,8", help="language model layers, comma-separated")
    parser.add_argument("--width", type=int, default=1024, help="language model width (4 heads)")
    parser.add_argument("--work", default=str(OUT / "streaming-vlm-work"))
    parser.add_argument("--ram-gb", type=float, default=0.7,
                        help="the run's host budget in GiB: what does not fit it is streamed from the files")
    args = parser.parse_args(argv)
    drive(args, "streaming_vlm", "import pipelines.runner, pipelines.internvl.backend, transformers",
          lambda depth, work: measure(int(depth), args.width, work, args.ram_gb),
          unit="layers", command="launch.py train --backend vlm --stages X", files="model files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
