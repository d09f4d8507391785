"""Write one held-out digit per class to examples/digits/ as a 64x64 PNG (for the README and demos).

Run: .venv/bin/python scripts/make_examples.py
"""

from pathlib import Path

from PIL import Image

from convray.workers.data import load_digits_split

OUT = Path(__file__).resolve().parent.parent / "examples" / "digits"


def main() -> None:
    """Save the first held-out image of each class, scaled up with nearest-neighbour pixels."""
    _, held_out = load_digits_split()
    OUT.mkdir(parents=True, exist_ok=True)
    for digit in range(10):
        index = int((held_out.labels == digit).nonzero()[0][0])
        image = Image.fromarray(held_out.images[index, 0], mode="L").resize((64, 64), Image.Resampling.NEAREST)
        image.save(OUT / f"digit-{digit}.png", optimize=True)
        print(OUT / f"digit-{digit}.png")


if __name__ == "__main__":
    main()
