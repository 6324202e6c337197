"""``featx similar FILE IMAGE_OR_ROW``: the images of an embedding file nearest an image of it or a new one.

A new image is embedded as the file's rows were (its backbone, weights, preprocessing, precision and test-time
views, through the predictor's ``Backbone``), so its features are comparable with the file's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from featx.data.images import ImageError, load_image
from featx.errors import DataError
from featx.store.embeddings import Embeddings, load_embeddings
from featx.store.neighbours import Neighbour
from featx.use.predict import Backbone


def similar(file: str | Path, query: str | int | Path, k: int = 10, split: str | None = None,
            index: str = "exact") -> list[Neighbour]:
    """The ``k`` images of ``file`` nearest ``query``: a row number of the file, or an image file."""
    emb = load_embeddings(file)
    return emb.neighbours(query_of(emb, query), k=k, split=split, index=index)


def query_of(emb: Embeddings, query: str | int | Path) -> int | np.ndarray:
    """A row number as it is; an image file as its features, embedded with the file's recipe."""
    if isinstance(query, int) or (isinstance(query, str) and query.isdigit() and not Path(query).exists()):
        return int(query)
    path = Path(query)
    if not path.is_file():
        raise DataError(f"{path}: no such image file (give an image or a row number of {emb.path.name})")
    if "weights_sha256" not in emb.meta:
        raise DataError(f"{emb.path}: made without a backbone ({emb.backbone}), so a new image cannot be embedded "
                        "as its rows were; query by row number")
    backbone = Backbone(emb.path.parent, emb.meta)
    if backbone.adapts_bn:
        raise DataError(f"{emb.path}: its rows were embedded with BatchNorm statistics of their own split "
                        "(--adapt-bn), which one new image cannot stand for; query by row number instead")
    try:
        pixels = load_image(path, backbone.preprocess)
    except ImageError as err:
        raise DataError(f"{path}: {err}") from None
    return backbone.features(pixels[None])[0]
