"""Write a small embeddings file in the format `mmkit evaluate retrieval --embeddings` reads.

There is no offline CLIP checkpoint, so the quickstart uses seeded synthetic embeddings with a
planted answer: 100 images (unit vectors in 64 dimensions) with 5 captions each, every caption
its image's vector plus Gaussian noise. The noise level sets how hard retrieval is (at the
default 3.0, about 80 % of the images rank one of their captions first and 55 % of the captions
their image).

    python examples/retrieval_embeddings.py OUT.safetensors [--noise 3.0] [--seed 0]
"""

from __future__ import annotations

import argparse

import numpy as np
from safetensors.numpy import save_file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--captions-per-image", type=int, default=5)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--noise", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    images = rng.normal(size=(args.images, args.dim))
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    text_to_image = np.repeat(np.arange(args.images), args.captions_per_image)
    noise = rng.normal(scale=args.noise / np.sqrt(args.dim), size=(len(text_to_image), args.dim))
    save_file({"image_embeds": images.astype(np.float32),
               "text_embeds": (images[text_to_image] + noise).astype(np.float32),
               "text_to_image": text_to_image.astype(np.int64)}, args.out)
    print(f"wrote {args.out}: {args.images} images x {args.captions_per_image} captions, {args.dim}-d")


if __name__ == "__main__":
    main()
