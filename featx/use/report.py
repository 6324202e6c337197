"""The self-contained HTML report of a run folder: leaderboard, per-head scores and plots, example and
most confidently wrong images, fine-tuning curves and provenance, every image embedded."""

from __future__ import annotations

import base64
import csv
import io
import json
import os
from pathlib import Path

from jinja2 import Environment

from featx.shift.audit import LabelIssue, checked_labels, outliers
from featx.errors import DataError
from featx.comparison.leaderboard import Leaderboard, format_cell
from featx.data.images import ImageError, open_rgb
from featx.comparison.embedding_map import dataset_map
from featx.comparison.runs import finetune_plots, load_run, map_path
from featx.store.embeddings import Embeddings, load_embeddings, read_meta

REPORT_TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>featx report: {{ name }}</title>
<style>
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1150px; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.85em; }
.scroll { overflow-x: auto; } .plots { display: flex; flex-wrap: wrap; gap: 8px; align-items: flex-start; }
.plots img.plot { max-width: 560px; }
th, td { border: 1px solid #ddd; padding: 0.3em 0.6em; text-align: right; }
th { background: #f3f3f3; } td.text, th.text { text-align: left; }
tr.best td { background: #eef7ee; font-weight: 600; }
img.plot { max-width: 100%; border: 1px solid #eee; margin: 0.3em 0; }
.grid { display: flex; flex-wrap: wrap; gap: 8px; } .grid figure { margin: 0; width: 120px; font-size: 0.75em; }
.grid img { width: 120px; height: 120px; object-fit: cover; display: block; }
.grid figcaption { overflow-wrap: anywhere; }
.muted { color: #777; font-size: 0.85em; } code { background: #f6f6f6; padding: 0 0.2em; }
</style></head><body>
<h1>featx report: {{ name }}</h1>
<p class="muted">created {{ created }} · featx {{ version }} · {{ n_rows }} leaderboard rows · ranked by validation {{ sort_by }}; the test split was used for nothing but these numbers</p>

<h2 id="leaderboard">Leaderboard</h2>
<div class="scroll"><table><tr>{% for c in columns %}<th class="{{ 'text' if c in text_columns else '' }}">{{ c }}</th>{% endfor %}</tr>
{% for row in rows %}<tr class="{{ 'best' if loop.first else '' }}">{% for c in columns %}<td class="{{ 'text' if c in text_columns else '' }}">{{ fmt(row.get(c)) }}</td>{% endfor %}</tr>
{% endfor %}</table></div>

<h2 id="audit">Can these figures be trusted?</h2>
{% for item in audit.files %}<h3>{{ item.file }}</h3>
{% if item.validation_trained_on %}<p><strong>Optimistic validation:</strong> {{ item.validation_trained_on.images }} of this file's {{ item.validation_trained_on.of }} validation images trained its fine-tuned backbone, which held out others (<code>featx finetune --val-seed {{ item.validation_trained_on.finetune_seed }} --val-fraction {{ item.validation_trained_on.finetune_val_fraction }}</code>); compare with those settings for figures and choices it did not train on.</p>{% endif %}
{% if item.transductive %}<p><strong>Transductive test figures:</strong> this file's fine-tuned backbone trained on {{ item.transductive.test_images_trained_on }} test images with guessed labels (<code>featx finetune --pseudo-labels</code>), so its test figures are not a held-out estimate.</p>{% endif %}
{% if item.shift %}<p>{% if item.shift.shifted %}<strong>The test images differ from the training ones</strong> (a classifier tells them apart): validation figures are likely optimistic for test; fine-tuning is the lever to try (<code>featx advise</code> measures how far the images are from ImageNet); the options that adapt to the test images without their labels (<code>--align</code>, <code>--smooth-test</code>, <code>--threshold mixture</code>, <code>--adapt-bn</code>) each harmed on some dataset they were measured on: measure them on your own validation split.{% else %}No shift found between the training and test images: validation figures should carry over to test.{% endif %}</p>
<table><tr><th class="text">train → test</th><th>AUC (0.5 = alike)</th><th>p</th><th>rows a side</th></tr>
{% for name, t in item.shift.tests.items() %}<tr><td class="text">{{ name }}</td><td>{{ fmt(t.auc) }}</td><td>{{ fmt(t.p_value) }}</td><td>{{ t.rows }}</td></tr>{% endfor %}</table>
{% if item.least_alike %}<p class="muted">Test images least like the training ones:</p><div class="grid">{% for t in item.least_alike %}<figure><img src="data:image/jpeg;base64,{{ t.data }}" alt="{{ t.caption }}"><figcaption>{{ t.caption }}</figcaption></figure>{% endfor %}</div>{% endif %}
{% else %}<p class="muted">No shift check (no test split, or fewer than 100 rows in train or test).</p>{% endif %}
{% for remedy in item.remedies %}<p>{{ remedy.title }}: {{ remedy.summary }}.</p>{% endfor %}
{% endfor %}
{% if audit.priors %}<h3>Class balance of the test images (EM on each head's probabilities)</h3>
<table><tr><th class="text">head</th>{% for c in audit.classes %}<th>{{ c }}: val → test</th>{% endfor %}<th class="text">re-weighted</th></tr>
{% for p in audit.priors %}<tr><td class="text">{{ p.label }}</td>{% for c in audit.classes %}<td>{{ fmt(p.source[c]) }} → {{ fmt(p.target[c]) }}</td>{% endfor %}<td class="text">{{ 'yes' if p.applied else 'no' }}</td></tr>{% endfor %}</table>{% endif %}
<h3>Likely label errors in train ({{ audit.issue_count }})</h3>
{% if audit.issues %}<div class="grid">{% for t in audit.issues %}<figure><img src="data:image/jpeg;base64,{{ t.data }}" alt="{{ t.caption }}"><figcaption>{{ t.caption }}</figcaption></figure>{% endfor %}</div>
{% else %}<p class="muted">{{ audit.issues_note }}</p>{% endif %}
{% if audit.outliers %}<h3>Training images least like any class</h3><div class="grid">{% for t in audit.outliers %}<figure><img src="data:image/jpeg;base64,{{ t.data }}" alt="{{ t.caption }}"><figcaption>{{ t.caption }}</figcaption></figure>{% endfor %}</div>{% endif %}

<h2 id="map">Map of the dataset</h2>
{% if dataset_map.image %}<img class="plot" src="data:image/png;base64,{{ dataset_map.image }}" alt="map of {{ dataset_map.file }}">
<p class="muted">{{ dataset_map.method }} of {{ dataset_map.points }} of {{ dataset_map.total }} images of {{ dataset_map.file }}, seed {{ dataset_map.seed }} (<code>featx map</code> draws it again): colour is the class, shape the split; red crosses mark the likely label errors in train listed above, black rings the test images least like any train image{% if dataset_map.note %}; {{ dataset_map.note }}{% endif %}.</p>
{% if dataset_map.unlike %}<h3>Test images least like any train image</h3><div class="grid">{% for t in dataset_map.unlike %}<figure><img src="data:image/jpeg;base64,{{ t.data }}" alt="{{ t.caption }}"><figcaption>{{ t.caption }}</figcaption></figure>{% endfor %}</div>{% endif %}
{% else %}<p class="muted">{{ dataset_map.note }}</p>{% endif %}

{% if finetune %}<h2 id="finetune">Fine-tuning</h2>
{% for item in finetune %}<h3>{{ item.title }}</h3>{% for img in item.images %}<img class="plot" src="data:image/png;base64,{{ img }}" alt="{{ item.title }}">{% endfor %}{% endfor %}
{% endif %}

<h2 id="heads">Per head</h2>
{% for head in heads %}<h3>{{ head.backbone }} + {{ head.head }}</h3>
<p class="muted">{{ head.note }} · params {{ head.params }} · tuned on {{ head.tuned_on }} · validation: {{ head.val_source }}{% if head.threshold is not none %} · decision threshold {{ fmt(head.threshold) }}{% endif %}{% for remedy in head.remedies %} · {{ remedy.title }}: {{ remedy.summary }}{% endfor %}{% if head.not_reproducible_by_predict %} · <strong>not reproducible by predict</strong> ({{ head.not_reproducible_by_predict }}){% endif %}</p>
{% for split in head.splits %}<h4>{{ split.name }} (n={{ split.n }})</h4>
<table><tr><th class="text">class</th><th>precision</th><th>recall</th><th>F1</th><th>support</th></tr>
{% for cls, m in split.per_class.items() %}<tr><td class="text">{{ cls }}</td><td>{{ fmt(m.precision) }}</td><td>{{ fmt(m.recall) }}</td><td>{{ fmt(m.f1) }}</td><td>{{ m.support }}</td></tr>{% endfor %}
</table>
<div class="plots">{% for img in split.images %}<img class="plot" src="data:image/png;base64,{{ img }}" alt="{{ split.name }} plot">{% endfor %}</div>
{% endfor %}{% endfor %}

<h2 id="examples">Examples per class</h2>
{% if examples %}{% for cls, items in examples.items() %}<h4>{{ cls }}</h4><div class="grid">
{% for item in items %}<figure><img src="data:image/jpeg;base64,{{ item.data }}" alt="{{ item.caption }}"><figcaption>{{ item.caption }}</figcaption></figure>{% endfor %}</div>{% endfor %}
{% else %}<p class="muted">The images are not reachable from here ({{ dataset_root }}).</p>{% endif %}

<h2 id="wrong">Most confidently wrong ({{ wrong_title }})</h2>
{% if wrong %}<div class="grid">{% for item in wrong %}<figure><img src="data:image/jpeg;base64,{{ item.data }}" alt="{{ item.caption }}"><figcaption>{{ item.caption }}</figcaption></figure>{% endfor %}</div>
{% else %}<p class="muted">No wrong predictions, or the images are not reachable.</p>{% endif %}

<h2 id="provenance">Provenance</h2>
<table>{% for key, value in provenance %}<tr><th class="text">{{ key }}</th><td class="text"><code>{{ value }}</code></td></tr>{% endfor %}</table>
</body></html>
"""
TEXT_COLUMNS = {"backbone", "head", "test_accuracy_ci", "test_roc_auc_ci", "not_reproducible_by_predict"}


def _b64(path: Path) -> str:
    return base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _thumbnail(path: Path, size: int = 120) -> str | None:
    """A small JPEG of an image, base64-encoded, or None when it cannot be read."""
    try:
        img = open_rgb(path, min_side=size)
    except (ImageError, OSError):
        return None
    img.thumbnail((size * 2, size * 2))
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=80)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def write_report(run_dir: str | Path, examples_per_class: int = 8, wrong_count: int = 12) -> Path:
    """One self-contained HTML file (every image embedded) for a ``featx compare`` run folder."""
    loaded = load_run(run_dir)
    run_dir, run, rows = loaded.folder, loaded.info, loaded.rows
    missing = [name for name in run.get("plots", []) if not (run_dir / name).exists()]
    if missing:
        raise DataError(f"{run_dir}: {len(missing)} plots of this run are missing (e.g. {missing[0]}); re-run "
                        "`featx compare --out` to make them again")
    inputs = {i.get("name") or Path(i["path"]).name: i for i in run["inputs"]}

    heads = []
    for result in run["results"]:
        splits = []
        for split in ("val", "test"):
            if result.get(split):
                images = [_b64(p) for p in loaded.plots(result["file"], result["head"], split)]
                splits.append({"name": split, "n": result[split]["n"], "per_class": result[split]["per_class"],
                               "images": images})
        heads.append({**result, "params": json.dumps(result["params"]), "splits": splits,
                      "remedies": remedy_lines(result.get("remedies"))})

    best = rows[0]
    best_input = inputs.get(best["file"], {})
    source = (best_input.get("parts") or [best_input.get("path")])[0]  # concatenated inputs: their first part
    meta = _embeddings_meta(source)
    root = Path(meta["dataset_root"]) if meta.get("dataset_root") else None
    reachable = root is not None and root.is_dir()
    examples = _examples(root, Path(source), examples_per_class) if reachable else {}
    predictions = loaded.predictions(best["file"], best["head"])
    emb = load_embeddings(source) if source and Path(source).exists() else None
    checked = checked_labels(emb) if emb is not None else ([], "The embedding file is not reachable from here.")
    wrong = _confidently_wrong(root, predictions[0], wrong_count) if predictions and reachable else []

    provenance = [("featx", run["featx_version"]), ("created", run["created"]),
                  ("config", json.dumps(run["config"])), ("versions", json.dumps(run["versions"]))]
    for item in run["inputs"]:
        m = _embeddings_meta(item["path"])
        recipe = {k: m.get(k) for k in ("backbone", "label", "weights", "weights_sha256", "layer", "image_size",
                                        "resize", "interpolation", "tta", "tta_views", "precision", "dtype",
                                        "dataset_root", "split_source", "torch_version", "device") if k in m}
        provenance.append((f"{Path(item['path']).name} (cache key {item['cache_key']})",
                           json.dumps({"sha256": item["sha256"], **recipe})))

    env = Environment(autoescape=True)
    html = env.from_string(REPORT_TEMPLATE).render(
        name=run_dir.name, created=run["created"], version=run["featx_version"], n_rows=len(rows),
        sort_by=run["config"].get("sort_by", "balanced_accuracy"), rows=rows, fmt=format_cell,
        columns=[c for c in Leaderboard.COLUMNS if any(c in r for r in rows)], text_columns=TEXT_COLUMNS,
        heads=heads, examples=examples, dataset_root=str(root or "unknown"), wrong=wrong,
        wrong_title=f"{best['backbone']} + {best['head']}, {predictions[1]}" if predictions else "",
        finetune=_finetune_plots(run["inputs"]), provenance=provenance,
        audit=_audit(run, emb, root if reachable else None, checked),
        dataset_map=_dataset_map(run_dir, best["file"], emb, root if reachable else None, checked),
    )
    path = run_dir / "report.html"
    partial = path.with_name(path.name + ".partial")
    partial.write_text(html, encoding="utf-8")
    os.replace(partial, path)  # never half a report under the final name
    return path


def remedy_lines(records: dict | None) -> list[dict]:
    """Each remedy a run recorded (run.json's ``remedies``), as the report lists it: its name and one sentence."""
    return [{"title": name.replace("_", " "), "summary": record.get("summary") or record}
            for name, record in (records or {}).items()]


def _audit(run: dict, emb: Embeddings | None, root: Path | None, checked: tuple[list[LabelIssue], str],
           count: int = 12) -> dict:
    """The report's audit section: what compare recorded (shift, leaks, alignment, class balance) and, on the best
    input's training rows, likely label errors and outliers with thumbnails where the images are reachable."""
    config = run["config"]
    files = []
    for item in run["inputs"]:
        name = item.get("name") or Path(item["path"]).name
        shift = (config.get("shift") or {}).get(name)
        least = [{"data": data, "caption": rel.split("/")[-1]} for rel in (shift or {}).get("least_alike", [])[:8]
                 if root and (data := _thumbnail(root / rel))]
        files.append({"file": name, "shift": shift, "least_alike": least,
                      "remedies": remedy_lines((config.get("remedies") or {}).get(name)),
                      "transductive": (config.get("transductive") or {}).get(name),
                      "validation_trained_on": (config.get("validation_trained_on") or {}).get(name)})
    priors = [{"label": f"{r['backbone']} + {r['head']}", **r["remedies"]["prior_shift"]} for r in run["results"]
              if "prior_shift" in r.get("remedies", {})]
    section = {"files": files, "priors": priors, "classes": list(priors[0]["source"]) if priors else [],
               "issues": [], "outliers": [], "issue_count": 0, "issues_note": ""}
    issues, why_not = checked
    if emb is None or why_not:
        section["issues_note"] = why_not
        return section
    section["issue_count"] = len(issues)
    section["issues_note"] = "None found." if not issues else "The images are not reachable from here."
    if root:
        for issue in issues[:count]:
            rel = emb.paths[issue.row]
            if data := _thumbnail(root / rel):
                section["issues"].append({"data": data, "caption": f"{rel.split('/')[-1]}: labelled "
                                          f"{emb.classes[issue.given]}, looks {emb.classes[issue.suggested]} "
                                          f"({issue.p_suggested:.2f})"})
        section["outliers"] = [{"data": data, "caption": f"{emb.paths[row].split('/')[-1]} ({distance:.2f})"}
                               for row, distance in outliers(emb, "train", count // 2)
                               if (data := _thumbnail(root / emb.paths[row]))]
    return section


def _dataset_map(run_dir: Path, file_name: str, emb: Embeddings | None, root: Path | None,
                 checked: tuple[list[LabelIssue], str]) -> dict:
    """The map of the best input's images, written into the run folder, and thumbnails of the test images least
    like train where the images are reachable."""
    if emb is None:
        return {"note": "The embedding file is not reachable from here."}
    made = dataset_map(emb, checked=checked)
    png = made.save(map_path(run_dir, file_name))
    unlike = [{"data": data, "caption": emb.paths[row].split("/")[-1]} for row in made.least_like_train[:8]
              if root and (data := _thumbnail(root / emb.paths[row]))]
    return {"image": _b64(png), "file": emb.path.name, "method": made.method, "points": len(made.rows),
            "total": made.total, "seed": made.seed, "note": made.note, "unlike": unlike}


def _embeddings_meta(path) -> dict:
    try:
        return read_meta(path) if path else {}
    except DataError:
        return {}


def _examples(root: Path, embeddings_path: Path, per_class: int) -> dict:
    """A few training images per class, read from the dataset the embeddings were made from."""
    emb = load_embeddings(embeddings_path)
    split = "train" if "train" in emb.split_names else None
    paths, labels = emb.paths_of(split), emb.labels(split)
    grid = {}
    for k, name in enumerate(emb.classes):
        items = []
        for rel in paths[labels == k][:per_class]:
            data = _thumbnail(root / rel)
            if data:
                items.append({"data": data, "caption": rel.split("/")[-1]})
        grid[name] = items
    return grid


def _confidently_wrong(root: Path, predictions_csv: Path, count: int) -> list[dict]:
    with open(predictions_csv, newline="") as handle:
        records = [r for r in csv.DictReader(handle) if r["path"] and r["truth"] != r["predicted"]]
    records.sort(key=lambda r: -float(r[f"p_{r['predicted']}"]))
    wrong = []
    for r in records[:count]:
        data = _thumbnail(root / r["path"])
        if data:
            confidence = float(r[f"p_{r['predicted']}"])
            wrong.append({"data": data, "caption": f"{r['path'].split('/')[-1]}: {r['truth']} → "
                                                   f"{r['predicted']} ({confidence:.2f})"})
    return wrong


def _finetune_plots(inputs: list[dict]) -> list[dict]:
    """Training curves and LR-finder plots of the fine-tunes whose checkpoints made any of the inputs."""
    found = []
    for item in inputs:
        checkpoint = (_embeddings_meta(item["path"]).get("config") or {}).get("checkpoint")
        images = [_b64(p) for p in finetune_plots(checkpoint)] if checkpoint else []
        if images:
            found.append({"title": f"{Path(item['path']).name} — fine-tune run {Path(checkpoint).parent}",
                          "images": images})
    return found
