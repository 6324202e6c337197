"""Backbones × heads (× remedies) on cached embeddings: the ``Leaderboard``, the run folder and every
artifact in it (plots included). torch-free."""
