"""The pictures in the image-models docs, drawn from what `benchmarks/run_vision_compare.py --shots 16` left:
the learned pixel prompt of its pixel-prompt row (from the row's prompt file) and the confusion matrix of its
VPT-deep row on the test split (from the results JSON; nothing is recomputed).

    python benchmarks/vision_pictures.py -> docs/images/fashion_pixel_prompt.png, fashion_vpt_deep_confusion.png
"""

from __future__ import annotations

import json
from pathlib import Path

from softprompt.files import read_prompt
from softprompt.pictures import confusion_png, pixel_prompt_image

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    rows = {r["key"]: r for r in json.loads((ROOT / "benchmarks/results/compare_fashion_mnist.json").read_text())
            ["settings"]["16"]["rows"]}
    out = ROOT / "docs/images"
    out.mkdir(exist_ok=True)
    pixel_prompt_image(read_prompt(ROOT / rows["pixel_prompt"]["prompt_file"])).save(out / "fashion_pixel_prompt.png")
    deep = rows["vpt_deep"]
    confusion_png(deep, out / "fashion_vpt_deep_confusion.png",
                  title=f"VPT-deep, 16 images per class: accuracy {deep['accuracy']:.1%} (n={deep['n']:,})")
    print(f"wrote {out / 'fashion_pixel_prompt.png'} and {out / 'fashion_vpt_deep_confusion.png'}")


if __name__ == "__main__":
    main()
