"""The head registry (scikit-learn pipelines), head files that never run code, every metric, and the
open-set (``unknown``) scores. torch-free."""
