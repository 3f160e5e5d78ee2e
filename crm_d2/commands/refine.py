"""`crm-d2 refine`: one image + mask, or a whole BIG-layout folder (resumable)."""
from pathlib import Path

from tqdm import tqdm

from ..io import list_big, read_image, read_mask, write_png
from .common import add_model_arguments, build_refiner

NAME = "refine"
HELP = "refine one mask (IMAGE MASK -o OUT.png) or a BIG-layout folder (--big-dir DIR -o OUTDIR)"


def add_arguments(parser):
    parser.add_argument("inputs", nargs="*", metavar="IMAGE MASK", help="an image and its coarse mask")
    parser.add_argument("--big-dir", help="folder of NAME_im.jpg + NAME_seg.png (BIG layout)")
    parser.add_argument("-o", "--output", required=True, help="output PNG (single) or folder (--big-dir)")
    add_model_arguments(parser)
    parser.add_argument("--scales", type=float, nargs="+", default=None,
                        help="refinement schedule (default: the checkpoint's, else 0.125 0.25 0.5 1)")
    parser.add_argument("--roi", action="store_true", help="refine only the mask's box plus a margin (CRM*)")
    parser.add_argument("--margin", type=float, default=0.5, help="ROI context, fraction of the box size")
    parser.add_argument("--max-side", type=int, default=None, help="cap on the encoder's input long side")
    parser.add_argument("--binary", action="store_true", help="write 0/255 masks instead of soft 0..255")
    parser.add_argument("--overwrite", action="store_true", help="redo outputs that already exist")


def run(args):
    if bool(args.big_dir) == bool(args.inputs):
        raise ValueError("give either IMAGE MASK or --big-dir DIR")
    if args.inputs and len(args.inputs) != 2:
        raise ValueError(f"expected IMAGE MASK, got {len(args.inputs)} paths")
    if args.big_dir:
        jobs = [(it["image"], it["seg"], Path(args.output) / f"{it['name']}.png") for it in list_big(args.big_dir)]
    else:
        jobs = [(Path(args.inputs[0]), Path(args.inputs[1]), Path(args.output))]
    todo = [j for j in jobs if args.overwrite or not j[2].exists()]
    if len(todo) < len(jobs):
        print(f"skipping {len(jobs) - len(todo)} finished outputs (use --overwrite to redo them)")
    if not todo:
        return 0
    refiner = build_refiner(args)
    kind = "binary" if args.binary else "uint8"
    for image_path, mask_path, out in tqdm(todo, desc="refine", unit="img", disable=len(todo) == 1):
        image, mask = read_image(image_path), read_mask(mask_path)
        if image.shape[:2] != mask.shape:
            raise ValueError(f"{mask_path} is {mask.shape[1]}x{mask.shape[0]} but {image_path} is "
                             f"{image.shape[1]}x{image.shape[0]}")
        pred = refiner.refine(image, mask, roi=args.roi, margin=args.margin, max_side=args.max_side, output=kind)
        write_png(out, pred.astype("uint8") * 255 if kind == "binary" else pred)
    print(f"wrote {len(todo)} mask(s) to {args.output}")
    return 0
