# Sourced by the grpcurl and curl walkthroughs: the product's second image and the figures both check.
# Needs: $image (the packshot), $second (another view of it, or empty), $PYTHON (with PIL), $work (a temp dir).
# Sets: BOX (the detail view's box of the packshot, in fractions of its width and height: the region searched
# for), POPULARITY (the product's numeric attribute), and $second (a crop of the packshot to BOX when empty).
BOX='{"x0": 0.25, "y0": 0.15, "x1": 0.85, "y1": 0.80}'
POPULARITY=1520
if [ -z "$second" ]; then
  second=$work/detail.png
  "$PYTHON" -c 'import json, sys
from PIL import Image
box = json.loads(sys.argv[3])
with Image.open(sys.argv[1]) as im:
    w, h = im.size
    im.crop((round(box["x0"] * w), round(box["y0"] * h), round(box["x1"] * w), round(box["y1"] * h))).save(sys.argv[2])' \
    "$image" "$second" "$BOX"
fi
