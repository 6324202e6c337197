"""``extract --adapt-bn``: BatchNorm statistics of each split's own images (AdaBN), recorded here so that a run
says it used them; the predictor's backbone (``featx.use.predict``) embeds new images with their own statistics."""

from __future__ import annotations

from featx.shift.remedy import Remedy


class AdaptBatchNorm(Remedy):
    name = parameter = "adapt_bn"
    stage = "extraction"
    not_exportable = ("its features were embedded with BatchNorm statistics of each split's own images, and new "
                      "images need statistics of theirs; an ONNX graph holds fixed ones (use `featx predict "
                      "--adapt-to` or `featx serve --adapt-to`)")

    def describe(self, value) -> str:
        return ("each split embedded with BatchNorm statistics of its own images (--adapt-bn); predict takes new "
                "images' statistics from --adapt-to, or else its first call's images, and keeps them")
