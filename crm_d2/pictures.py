"""Side-by-side pictures (image | coarse | refined, ...) so that users can judge refinement by eye.

One home for the demo's panoptic pictures, `crm-d2 refine --overlay` and the report's gallery crops
(`outlined_crop`); written as PNG, so that the boundaries being judged are not blurred by JPEG.
"""
import cv2
import numpy as np

from .metrics import outline

__all__ = ["overlay", "side_by_side", "mask_panel", "draw_title", "outlined_crop"]


def _colour(category_id):
    rng = np.random.default_rng(category_id * 7919 + 1)
    return rng.integers(40, 256, 3).astype(np.float32)


def overlay(image, ids, segments, alpha=0.55):
    """Image with each segment tinted by its category colour and its boundary drawn in white."""
    out = image.astype(np.float32)
    for s in segments:
        m = ids == s["id"]
        out[m] = (1 - alpha) * out[m] + alpha * _colour(s["category_id"])
    edge = np.zeros(ids.shape, bool)
    edge[:, 1:] |= ids[:, 1:] != ids[:, :-1]
    edge[1:, :] |= ids[1:, :] != ids[:-1, :]
    out[edge] = 255
    return out.astype(np.uint8)


def draw_title(tile, text):
    """White title with a black outline, in place. The outline is the text's own strokes grown (not a second,
    thicker putText: OpenCV advances each glyph by the stroke thickness, so that one drifts off the text)."""
    scale = max(0.5, tile.shape[1] / 500)
    ink = np.zeros(tile.shape[:2], np.uint8)
    cv2.putText(ink, text, (8, int(28 * scale) + 4), cv2.FONT_HERSHEY_SIMPLEX, scale, 255, max(1, round(scale)),
                cv2.LINE_AA)
    r = max(1, round(1.5 * scale))
    halo = cv2.dilate(ink, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1)))
    out = tile.astype(np.float32) * (1 - halo[..., None] / 255.0)
    out += (255.0 - out) * (ink[..., None] / 255.0)
    tile[:] = np.round(out).astype(np.uint8)
    return tile


def side_by_side(image, panels):
    """[(title, id map, segments)] -> one RGB picture, panels left to right with their titles."""
    tiles = []
    for title, ids, segs in panels:
        tiles.append(draw_title(overlay(image, ids, segs), title))
        tiles.append(np.full((image.shape[0], 4, 3), 255, np.uint8))
    return np.concatenate(tiles[:-1], axis=1)


def mask_panel(title, *masks):
    """One or more binary masks as a side_by_side panel, each tinted in its own colour (an empty mask shows the
    plain image)."""
    ids = np.zeros(np.shape(masks[0]), np.int32)
    for k, m in enumerate(masks):
        ids[np.asarray(m, bool)] = k + 1
    return title, ids, [{"id": k + 1, "category_id": k + 1} for k in range(len(masks))]


def outlined_crop(image, box, outlines, side=320):
    """The photo inside box (x0, y0, x1, y1, clipped to it) scaled so that its long side is `side` px, with each
    (mask, RGB colour) of `outlines` drawn as a 2-px boundary in that colour, later ones on top.

    Masks are the photo's size (HxW bool) or already the box's size. The boundaries are drawn after scaling, so
    that they stay visible on a large segment shrunk to a thumbnail and sharp on a small one enlarged."""
    h, w = image.shape[:2]
    x0, y0 = max(0, int(box[0])), max(0, int(box[1]))
    x1, y1 = min(w, int(box[2])), min(h, int(box[3]))
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"crop box {tuple(box)} holds no pixel of a {w}x{h} photo")
    scale = side / max(x1 - x0, y1 - y0)
    size = (max(1, round((x1 - x0) * scale)), max(1, round((y1 - y0) * scale)))
    shrink = scale < 1
    out = cv2.resize(image[y0:y1, x0:x1], size, interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)
    thick = np.ones((2, 2), np.uint8)
    for mask, colour in outlines:
        mask = np.asarray(mask, bool)
        if mask.shape[:2] == (h, w):
            mask = mask[y0:y1, x0:x1]
        scaled = cv2.resize(mask.astype(np.float32), size, interpolation=cv2.INTER_AREA if shrink else
                            cv2.INTER_LINEAR) >= 0.5
        line = cv2.dilate(outline(scaled).astype(np.uint8), thick) > 0
        out[line] = colour
    return out
