"""``extract --tta-views K``: each image's features averaged over K fixed augmented views, recorded here so that
a run says it used them; the predictor's backbone embeds new images with the same fixed views."""

from __future__ import annotations

from featx.shift.remedy import Remedy


class TestTimeViews(Remedy):
    name = parameter = "tta_views"
    stage = "extraction"
    not_exportable = ("its features average augmented views made by seeded random transforms in Python, which "
                      "torch.onnx cannot trace into fixed graph operations; extract without --tta-views to export")

    def describe(self, value) -> str:
        return f"features averaged over {value} fixed augmented views (--tta-views); predict embeds new images with them"
