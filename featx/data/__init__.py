"""Finding images and labels on disk or at URLs, splitting them with a seed, decoding one image safely,
the augmentation policies, and the chest X-ray sample bundled with featx."""
