"""Thumbnails of the example workflows: ``example_workflows/<name>.jpg``, what ComfyUI's template
browser shows on each workflow's card (it asks for ``/api/workflow_templates/svare/<name>.jpg``).

    python scripts/make_thumbnails.py            # all workflows, from their real outputs on the toy model
    python scripts/make_thumbnails.py --train    # train Erase Concept nodes instead of the stored patches

Each thumbnail is made from what the workflow itself outputs (scripts/workflow_runner.py runs its
graph): the images of its Save Image nodes (else of its Preview Image nodes, side by side in the order
the graph makes them), a Compare grid as it is, a batch of four as 2 x 2, fitted into a square (the
card shows 256 x 256 CSS px).
"""
from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import workflow_runner as wr  # noqa: E402

SIZE = 384                    # px; the card is 256 CSS px, this stays sharp at 1.5x
BACKGROUND = (24, 24, 24)     # the Compare grid's background
MAX_BYTES = 60_000


def shown_images(path: Path, run: wr.Run) -> list[list]:
    """The images of the workflow's Save Image nodes, else of all its Preview Image nodes: one list per
    node, in the order the graph makes them."""
    wf = wr.load(path)
    links = {link[0]: link for link in wf["links"]}
    rank = {n["id"]: i for i, n in enumerate(wr.order(wf))}
    kind = "SaveImage" if any(n["type"] == "SaveImage" for n in wf["nodes"]) else "PreviewImage"
    nodes = [n for n in wf["nodes"] if n["type"] == kind]
    nodes.sort(key=lambda n: rank[links[n["inputs"][0]["link"]][1]])
    return [list(run.shown[n["id"]]) for n in nodes]


def block(images):
    """A batch as a near-square block (4 images: 2 x 2); one image as it is."""
    from PIL import Image

    n, (w, h) = len(images), images[0].size
    cols = min(range(1, n + 1), key=lambda c: (abs(c * w - -(-n // c) * h), -c))
    out = Image.new("RGB", (cols * w, -(-n // cols) * h), BACKGROUND)
    for i, im in enumerate(images):
        out.paste(im, ((i % cols) * w, (i // cols) * h))
    return out


def thumbnail(groups: list[list]):
    """Each output node's images as a block, the blocks side by side, fitted into a SIZE x SIZE square."""
    from PIL import Image

    from svare_core import imageio

    blocks = [block([imageio.to_pil(x).convert("RGB") for x in g]) for g in groups]
    gap = 8 if len(blocks) > 1 else 0
    sheet = Image.new("RGB", (sum(b.width for b in blocks) + gap * (len(blocks) - 1), max(b.height for b in blocks)),
                      BACKGROUND)
    x = 0
    for b in blocks:
        sheet.paste(b, (x, (sheet.height - b.height) // 2))
        x += b.width + gap
    scale = SIZE / max(sheet.size)
    if scale >= 1:          # small toy images: enlarge by a whole factor, pixels stay crisp
        scale = max(1, int(scale))
        sheet = sheet.resize((sheet.width * scale, sheet.height * scale), Image.NEAREST)
    else:
        sheet = sheet.resize((max(1, round(sheet.width * scale)), max(1, round(sheet.height * scale))), Image.LANCZOS)
    out = Image.new("RGB", (SIZE, SIZE), BACKGROUND)
    out.paste(sheet, ((SIZE - sheet.width) // 2, (SIZE - sheet.height) // 2))
    return out


def jpeg(img, max_bytes: int = MAX_BYTES) -> bytes:
    for quality in (88, 80, 70, 60, 50):
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=quality, optimize=True)
        if buf.tell() <= max_bytes:
            break
    return buf.getvalue()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", help="workflow names (file stems); default: all")
    ap.add_argument("--train", action="store_true", help="train Erase Concept nodes instead of the stored patches")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    for path in wr.workflows():
        if args.names and path.stem not in args.names:
            continue
        run = wr.run_workflow(path, train=args.train)
        data = jpeg(thumbnail(shown_images(path, run)))
        out = path.with_suffix(".jpg")
        out.write_bytes(data)
        print(f"{out.relative_to(wr.ROOT)}: {len(data):,} bytes ({run.seconds:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
