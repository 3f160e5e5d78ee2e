"""`crm-d2 refine`: one image + mask, or a whole BIG-layout folder (resumable).

Masks are written soft by default: each pixel is floor(255 x the refined probability), 0..255; `--binary` writes
0/255 (probability above 0.5). A folder run records its settings in OUT/run.json and refuses to resume under other
settings (`--overwrite` redoes it), so that OUT never mixes two configurations; a single output is always
rewritten. `--overlay DIR` adds image | coarse | refined pictures to judge the results by eye.
"""
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..distributed import session
from ..io import check_mask_path, list_big, read_image, read_mask, write_image, write_mask
from ..pictures import mask_panel, side_by_side
from .common import add_model_arguments, add_scales_argument, build_refiner, check_run_settings, model_settings

NAME = "refine"
HELP = ("refine one mask (IMAGE MASK -o OUT.png) or a BIG-layout folder (--big-dir DIR -o OUTDIR); writes soft "
        "0..255 masks (--binary: 0/255)")
USAGE = ("%(prog)s IMAGE MASK -o OUT.png [options]\n"
         "       %(prog)s --big-dir DIR -o OUTDIR [options]")


def add_arguments(parser):
    parser.add_argument("inputs", nargs="*", metavar="IMAGE MASK", help="an image and its coarse mask (one pair)")
    parser.add_argument("--big-dir", metavar="DIR", help="folder of NAME_im.jpg + NAME_seg.png (BIG layout)")
    parser.add_argument("-o", "--output", required=True, metavar="OUT",
                        help="output mask, .png (or .bmp/.tif; rewritten if present), or folder (--big-dir; "
                             "resumable, NAME.png per image)")
    add_model_arguments(parser)
    add_scales_argument(parser)
    parser.add_argument("--roi", action="store_true", help="refine only the mask's box plus a margin (CRM*)")
    parser.add_argument("--margin", type=float, default=0.5, help="with --roi: context, fraction of the box size")
    parser.add_argument("--max-side", type=int, default=None,
                        help="cap on the encoder's input long side (default: no cap)")
    parser.add_argument("--binary", action="store_true",
                        help="write 0/255 masks (refined probability > 0.5) instead of the default soft masks "
                             "(0..255 = 255 x the refined probability)")
    parser.add_argument("--overlay", metavar="DIR",
                        help="also write image | coarse | refined pictures (PNG, one per mask) to DIR")
    parser.add_argument("--overwrite", action="store_true",
                        help="folder runs: redo every output, also under changed settings")


def run(args):
    with session(args.device) as env:
        return _run(args, env)


def _run(args, env):
    """The command on one process. Under torchrun every rank runs it and refines its share of the unfinished
    masks; rank 0 alone records the settings and prints (docs/panoptic.md, 'Many GPUs')."""
    if bool(args.big_dir) == bool(args.inputs):
        raise ValueError("give either IMAGE MASK or --big-dir DIR")
    if args.inputs and len(args.inputs) != 2:
        raise ValueError(f"expected one IMAGE MASK pair, got {len(args.inputs)} paths (for many, use --big-dir)")
    out = Path(args.output)
    skipped = []
    if args.big_dir:
        jobs = [(it["image"], it["seg"], out / f"{it['name']}.png")
                for it in list_big(args.big_dir, skipped=skipped)]
        if args.overlay and Path(args.overlay).resolve() == out.resolve():
            raise ValueError("--overlay needs a folder other than -o (the pictures would replace the masks)")
    else:
        check_mask_path(out)
        if out.resolve() in (Path(p).resolve() for p in args.inputs):
            raise ValueError(f"-o {out} is one of the inputs")
        jobs = [(Path(args.inputs[0]), Path(args.inputs[1]), out)]

    def finished():  # rank 0 alone (the others may already be writing); a single output is always rewritten
        if (args.big_dir and not args.overwrite and not (out / "run.json").is_file()
                and any(j[2].exists() for j in jobs)):
            raise ValueError(f"{out} holds masks but no record of their settings (run.json): rerun with "
                             "--overwrite to redo them, or use another -o")
        return [bool(args.big_dir) and not args.overwrite and j[2].exists() for j in jobs]

    def record():  # rank 0 alone, after the refiner is built: a mistyped --weights records nothing
        if args.big_dir and args.overwrite:
            for j in jobs:  # deleted first: a killed --overwrite run then resumes under the new settings
                j[2].unlink(missing_ok=True)
            check_run_settings(out, run_settings(args), replace=True)
        elif args.big_dir:
            check_run_settings(out, run_settings(args), redo_flag="--overwrite")

    say = print if env.main else (lambda *a, **k: None)  # the other ranks print nothing but errors
    is_done = env.decide(finished)
    for name, why in skipped:
        say(f"skipped {name}: {why}", file=sys.stderr)
    todo = [j for j, f in zip(jobs, is_done) if not f]
    done = [j for j, f in zip(jobs, is_done) if f]
    if todo:
        refiner = build_refiner(args, env.device)
    env.decide(record)
    if done:
        say(f"skipping {len(done)} finished outputs (use --overwrite to redo them)")
    kind = "binary" if args.binary else "uint8"
    mine = env.shard(todo)  # the unfinished ones are shared out, so that a resumed run stays balanced
    for image_path, mask_path, dest in tqdm(mine, desc="refine", unit="img", disable=len(mine) < 2 or not env.main):
        image, mask = read_image(image_path), read_mask(mask_path, colour="refuse")
        if image.shape[:2] != mask.shape:
            raise ValueError(f"{mask_path} is {mask.shape[1]}x{mask.shape[0]} but {image_path} is "
                             f"{image.shape[1]}x{image.shape[0]}")
        pred = refiner.refine(image, mask, roi=args.roi, margin=args.margin, max_side=args.max_side, output=kind)
        pred = pred.astype("uint8") * 255 if kind == "binary" else pred
        write_mask(dest, pred)
        if args.overlay:
            write_picture(args.overlay, image, mask, pred, dest.stem)
    pictures = 0
    if args.overlay:  # finished outputs of an earlier run get their pictures too, without refining again
        for image_path, mask_path, dest in env.shard(done):
            if not (Path(args.overlay) / f"{dest.stem}.png").exists():
                write_picture(args.overlay, read_image(image_path), read_mask(mask_path), read_mask(dest), dest.stem)
        pictures = len(jobs)
    env.barrier()  # the summary below is about every rank's outputs
    summary = f"wrote {len(todo)} mask(s) to {out}" + (f", kept {len(done)} finished" if done else "")
    if skipped:
        summary += f"; skipped {len(skipped)} image(s) without a coarse mask"
    if pictures:
        summary += f"; pictures (image | coarse | refined) in {args.overlay}"
    say(summary)
    return 0


def run_settings(args):
    """What decides a folder run's outputs (not device, memory budget or pictures: those do not change them)."""
    return {"big_dir": str(Path(args.big_dir).resolve()), **model_settings(args), "scales": args.scales,
            "roi": args.roi,
            "margin": args.margin if args.roi else None,
            "max_side": args.max_side, "binary": args.binary}


def write_picture(folder, image, coarse, refined, name):
    """image | coarse | refined (as written, 0..255) as DIR/NAME.png; masks shown at 50%, the coarse one read as
    the Refiner reads it (0/1 or 0..255)."""
    from ..inputs import to_mask_array

    panels = [mask_panel("image", np.zeros(coarse.shape, bool)), mask_panel("coarse", to_mask_array(coarse) > 0.5),
              mask_panel("refined", refined > 127)]
    write_image(Path(folder) / f"{name}.png", side_by_side(image, panels))
