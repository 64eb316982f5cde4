"""A static HTML report of a run: ``<run>/report/index.html``.

The metrics table (the paper's layout), the training curves, and for a sample of the split's queries the top
retrievals both ways, each with the alignment picture of the query and its top result (and of the query and its
right answer when the top result is wrong). Everything the page shows is copied into the report folder and
linked by relative paths, so the folder opens offline, anywhere, in any browser.
"""
from __future__ import annotations

import html
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pipeline.images import ImageLoadError

from .evaluate import annotation_ranks, metrics_table, search_ranks
from .explain import draw_alignment
from .runs import (RANDOM_WEIGHTS_NOTE, Run, alignment_dots, caption_triples, evaluation_markdown,
                   evaluation_result, file_stem, region_boxes, run_picture, split_scores, triple_labels)

log = logging.getLogger(__name__)

THUMB_PX = 240
OPTIONS_FILE = "options.json"  # the options a report was built with, beside its index.html


@dataclass
class Hit:
    rank: int
    score: float
    item_id: str
    text: str = ""  # caption text (annotation)
    image: str = ""  # thumbnail, relative to the report folder (search)
    correct: bool = False


@dataclass
class Example:
    query_id: str
    query_text: str = ""
    query_image: str = ""
    right_rank: int = 0  # rank of the (best) right answer, pessimistic on ties
    hits: list[Hit] = field(default_factory=list)
    pictures: list[tuple[str, str]] = field(default_factory=list)  # (relative PNG path, caption)


class _Builder:
    def __init__(self, run: Run, split_name: str, folder: Path, per_region: int):
        self.run, self.folder, self.per_region = run, folder, per_region
        self.split = run.store.split(split_name)
        self.image_ids = self.split.image_ids
        self.caption_ids = self.split.caption_ids
        self.texts = {c.caption_id: c.text for c in run.dataset.captions}
        (folder / "images").mkdir(parents=True, exist_ok=True)
        (folder / "align").mkdir(exist_ok=True)
        self._boxes: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def image(self, iid: str):
        """The dataset image (read inside the image root only), or None when there is none to show: no file
        (features read from files) or one refused (a link out of the root, damaged); refusals are logged."""
        try:
            return run_picture(self.run, iid)
        except ImageLoadError as e:
            (log.debug if e.reason == "file not found" else log.warning)("report: image %r not shown: %s", iid, e)
            return None

    def thumb(self, i: int) -> str:
        """The thumbnail's relative path (named by a hash of the id: never another image's); "" without one."""
        iid = self.image_ids[i]
        rel = f"images/{file_stem(iid)}.jpg"
        if not (self.folder / rel).exists():
            im = self.image(iid)
            if im is None:
                return ""
            im.thumbnail((THUMB_PX, THUMB_PX))
            im.save(self.folder / rel, "JPEG", quality=85)
        return rel

    def picture(self, i: int, j: int, tag: str) -> list[tuple[str, str]]:
        """The alignment picture of split image i and split caption j ([] without an image to draw on)."""
        iid, cid = self.image_ids[i], self.caption_ids[j]
        picture = self.image(iid)
        if picture is None:
            return []
        if iid not in self._boxes:
            self._boxes.update(region_boxes(self.run.store, [iid]))
        boxes, mask = self._boxes[iid]
        rel_, w1, w2 = caption_triples(self.split, j)
        dots, _ = alignment_dots(self.run, self.split, i, rel_, w1, w2)
        rel = f"align/{tag}-{file_stem(iid, cid)}.png"
        draw_alignment(picture, boxes, mask, dots,
                       triple_labels(self.run.store, rel_, w1, w2), self.folder / rel,
                       title=self.texts.get(cid, cid), per_region=self.per_region)
        return [(rel, f"{iid} with “{self.texts.get(cid, cid)}”")]


def build_report(run: Run, split_name: str = "test", out_dir: str | Path | None = None, *, n_queries: int = 4,
                 top: int = 5, seed: int = 0, per_region: int = 3, captions_per_image: int = 5,
                 fold_size: int = 1000) -> Path:
    """Write the report folder (default ``<run>/report``) and return its index.html."""
    final = Path(out_dir) if out_dir else run.folder / "report"
    _remove_stale_builds(final)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        _write_report(run, split_name, tmp, n_queries=n_queries, top=top, seed=seed, per_region=per_region,
                      captions_per_image=captions_per_image, fold_size=fold_size)
        if final.exists():  # swap in the finished folder; a killed build leaves only the temporary one
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old)
        else:
            tmp.rename(final)
        log.info("report: %s", final / "index.html")
        return final / "index.html"
    except BaseException:  # a failed or interrupted build leaves no half-written folder behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_report(run: Run, split_name: str, tmp: Path, *, n_queries: int, top: int, seed: int, per_region: int,
                  captions_per_image: int, fold_size: int) -> None:
    """The report's files, written into the folder ``tmp``."""
    b = _Builder(run, split_name, tmp, per_region)
    split = b.split
    scores_t = split_scores(run, split)  # (n_images, n_captions)
    result = evaluation_result(run, split_name, scores_t, captions_per_image, fold_size)
    scores, cap_img = scores_t.numpy(), split.caption_image.cpu().numpy()
    annotation_rank, search_rank = annotation_ranks(scores, cap_img), search_ranks(scores, cap_img)

    rng = np.random.default_rng(seed)
    with_caps = np.unique(cap_img)
    img_q = rng.choice(with_caps, size=min(n_queries, len(with_caps)), replace=False)
    cap_q = rng.choice(len(cap_img), size=min(n_queries, len(cap_img)), replace=False)

    annotation = []
    for i in img_q.tolist():
        row, right = scores[i], cap_img == i
        order = np.argsort(-row, kind="stable")[:top]
        ex = Example(b.image_ids[i], query_image=b.thumb(i), right_rank=int(annotation_rank[i]))
        ex.hits = [Hit(r + 1, float(row[j]), b.caption_ids[j], text=b.texts.get(b.caption_ids[j], ""),
                       correct=bool(right[j])) for r, j in enumerate(order.tolist())]
        ex.pictures.extend(b.picture(i, int(order[0]), "top"))
        if not right[order[0]]:
            own = np.flatnonzero(right)
            ex.pictures.extend(b.picture(i, int(own[np.argmax(row[own])]), "right"))
        annotation.append(ex)

    search = []
    for j in cap_q.tolist():
        col, right = scores[:, j], np.arange(len(scores)) == cap_img[j]
        order = np.argsort(-col, kind="stable")[:top]
        cid = b.caption_ids[j]
        ex = Example(cid, query_text=b.texts.get(cid, cid), right_rank=int(search_rank[j]))
        ex.hits = [Hit(r + 1, float(col[i]), b.image_ids[i], image=b.thumb(i), correct=bool(right[i]))
                   for r, i in enumerate(order.tolist())]
        ex.pictures.extend(b.picture(int(order[0]), j, "top"))
        if not right[order[0]]:
            ex.pictures.extend(b.picture(int(cap_img[j]), j, "right"))
        search.append(ex)

    if not any(ex.pictures for ex in annotation + search):  # scoring needs no image; the pictures do
        log.warning("report of %s: no image of the %s split is in the image folder %s, so it has no pictures "
                    "(pass --image-root with the folder the dataset's image paths are relative to)", run.name,
                    split_name, run.dataset.image_root)
    curves = run.folder / "curves.png"
    if curves.exists():
        shutil.copyfile(curves, tmp / "curves.png")
    (tmp / "index.html").write_text(render_html(run, result, annotation, search, curves.exists(), top),
                                    encoding="utf-8")
    options = {"split": split_name, "queries": n_queries, "top": top, "seed": seed, "per_region": per_region,
               "captions_per_image": captions_per_image, "fold_size": fold_size,
               "image_root": str(run.dataset.image_root)}
    (tmp / OPTIONS_FILE).write_text(json.dumps(options, indent=2) + "\n")  # what a rerun compares


def _remove_stale_builds(final: Path) -> None:
    """Temporary folders of builds whose process is gone (killed with -9, the machine restarted)."""
    for old in final.parent.glob(f".{final.name}.tmp-*"):
        pid = old.name.rsplit("-", 1)[1]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(old, ignore_errors=True)
        except PermissionError:  # alive, another user's
            pass


# ---------------------------------------------------------------------------------------------- HTML

CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
td:first-child, th:first-child { text-align: left; }
.query { border-top: 2px solid #888; margin-top: 2em; padding-top: 0.5em; }
.hits td, .hits th { vertical-align: middle; text-align: left; }
.right { background: #e3f6e3; }
.pictures img, .curves img { max-width: 100%; border: 1px solid #ddd; margin: 0.3em 0; }
.thumb { max-height: 120px; }
code { background: #f4f4f4; padding: 0 0.2em; }
"""


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _md_table_to_html(md: str) -> str:
    rows = [r.strip().strip("|").split("|") for r in md.splitlines() if r.startswith("|")]
    head, body = rows[0], rows[2:]
    out = ["<table>", "<tr>" + "".join(f"<th>{_e(c.strip())}</th>" for c in head) + "</tr>"]
    out += ["<tr>" + "".join(f"<td>{_e(c.strip())}</td>" for c in r) + "</tr>" for r in body]
    return "\n".join(out + ["</table>"])


def _thumb_img(src: str, alt: str) -> str:
    return f"<img class='thumb' src='{_e(src)}' alt='{_e(alt)}'>" if src else "<small>(no image file)</small>"


def _pictures(ex: Example) -> str:
    return "<div class='pictures'>" + "".join(
        f"<figure><img src='{_e(p)}' alt='{_e(c)}'><figcaption>{_e(c)}</figcaption></figure>"
        for p, c in ex.pictures) + "</div>"


def render_html(run: Run, result: dict, annotation: list[Example], search: list[Example], curves: bool,
                top: int) -> str:
    md = evaluation_markdown(result)
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>defrag report: {_e(run.name)}"
             f"</title><style>{CSS}</style></head><body>",
             f"<h1>defrag run <code>{_e(run.name)}</code></h1>",
             f"<p>Dataset <b>{_e(result['dataset']['name'])}</b>, split <b>{_e(result['split'])}</b>: "
             f"{result['all']['n_images']} images, {result['all']['n_captions']} captions; checkpoint of epoch "
             f"{result['checkpoint_epoch']}. Scores are the model's S<sub>kl</sub>; a right answer is shaded.</p>",
             "<h2>Retrieval</h2>", _md_table_to_html(md.split("\n\n")[1]),
             "<p>Recalls in %; ranks start at 1; ties are ranked pessimistically.</p>"]
    if result.get("detector_weights") == "random":
        parts.insert(3, f"<p style='color:#a00'><b>{_e(RANDOM_WEIGHTS_NOTE)}</b></p>")
    paper = result.get("published")
    if paper:  # the paper's figures, in their own labelled table under the run's
        parts.append(f"<h3>Published figures (not measured here)</h3><p>DeFrag on {_e(paper['label'])}, "
                     f"{_e(paper['protocol'])}, from {_e(paper['citation'])}.</p>")
        parts.append(_md_table_to_html(metrics_table(paper["rows"])) if paper["rows"] else
                     f"<p>The paper reports no {_e(paper['label'])} results.</p>")
    if curves:
        parts += ["<h2>Training</h2><div class='curves'><img src='curves.png' alt='training curves'></div>"]
    parts.append(f"<h2>Image annotation: top {top} captions for sample images</h2>")
    for ex in annotation:
        parts.append(f"<div class='query'><h3>{_e(ex.query_id)} <small>(best right caption at rank "
                     f"{ex.right_rank})</small></h3>{_thumb_img(ex.query_image, ex.query_id)}")
        parts.append("<table class='hits'><tr><th>rank</th><th>score</th><th>caption</th></tr>" + "".join(
            f"<tr class='{'right' if h.correct else ''}'><td>{h.rank}</td><td>{h.score:.3f}</td>"
            f"<td>{_e(h.text)} <small>({_e(h.item_id)})</small></td></tr>" for h in ex.hits) + "</table>")
        parts.append(_pictures(ex) + "</div>")
    parts.append(f"<h2>Image search: top {top} images for sample captions</h2>")
    for ex in search:
        parts.append(f"<div class='query'><h3>“{_e(ex.query_text)}” <small>({_e(ex.query_id)}; right image at "
                     f"rank {ex.right_rank})</small></h3>")
        parts.append("<table class='hits'><tr><th>rank</th><th>score</th><th>image</th><th>id</th></tr>" + "".join(
            f"<tr class='{'right' if h.correct else ''}'><td>{h.rank}</td><td>{h.score:.3f}</td>"
            f"<td>{_thumb_img(h.image, h.item_id)}</td><td>{_e(h.item_id)}</td></tr>"
            for h in ex.hits) + "</table>")
        parts.append(_pictures(ex) + "</div>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def report_images(index: str | Path) -> list[str]:
    """Every image the page links (src attributes), as written."""
    return re.findall(r"<img [^>]*src='([^']*)'", Path(index).read_text(encoding="utf-8"))


__all__ = ["build_report", "render_html", "report_images", "Example", "Hit"]
