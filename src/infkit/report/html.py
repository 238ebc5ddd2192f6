"""``report.html``: one self-contained page from a run's results (docs/report.md §4).

The page is built from the workdir's report artifact alone (``report.json`` and
``scores.safetensors``), so ``infkit report WORKDIR`` rebuilds it without the model. Everything
is inline: the CSS, the figures (PNG data URIs drawn by :mod:`infkit.plot`) and the thumbnails.
It has no script, and a Content-Security-Policy that forbids any request, so opening it
contacts no address. Sections: run summary, explanations (IF and RelatIF side by side),
score distribution, self-influence, group removal, retraining check, per-layer scores.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from torch import Tensor

from infkit import plot
from infkit.errors import ArtifactError, InvalidInputError, warn
from infkit.report.views import far_reading, retraining_name, value_range, worst_norm
from infkit.retrain import START_MOVE
from infkit.store import MANIFEST, ArtifactStore

KIND = "report"

#: (id, heading) of every section, in order
SECTIONS = (
    ("summary", "Run summary"),
    ("explanations", "Explanations"),
    ("distribution", "Score distribution"),
    ("self-influence", "Self-influence"),
    ("group-removal", "Group removal"),
    ("retraining", "Retraining check"),
    ("layers", "Per-layer scores"),
)

CSS = """
*{box-sizing:border-box}
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1b1f24;background:#fafafa}
header{background:#1f3a5f;color:#fff;padding:14px 24px}
header h1{margin:0;font-size:22px}
header p{margin:4px 0 0;opacity:.85}
header .alert{opacity:1;font-weight:600}
header .alert a{color:#ffd166}
nav{background:#fff;border-bottom:1px solid #ddd;padding:8px 24px;position:sticky;top:0}
nav a{margin-right:14px;color:#1f3a5f;text-decoration:none}
main{padding:8px 24px 40px;max-width:1400px}
section{background:#fff;border:1px solid #e2e2e2;border-radius:6px;margin:16px 0;padding:10px 18px}
h2{font-size:18px;margin:6px 0 10px}
h3{font-size:15px;margin:14px 0 6px}
table{border-collapse:collapse;font-size:13px}
td,th{border-bottom:1px solid #eee;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f4f6f8}
.num{text-align:right;white-space:nowrap;font-variant-numeric:tabular-nums}
.note{color:#666;font-style:italic}
.warning{background:#fdecea;border-left:4px solid #d62728;padding:6px 10px}
.notice{background:#eef3f9;border-left:4px solid #1f3a5f;padding:6px 10px}
.query{border-top:2px solid #1f3a5f;padding-top:8px;margin-top:14px}
.query-head{display:flex;gap:16px;align-items:flex-start}
.sides{display:grid;grid-template-columns:minmax(0,1fr) minmax(0,1fr);gap:18px}
.scroll{overflow-x:auto;max-width:100%}
tr.query-row td{background:#eef3f8;font-weight:600}
.side h4{margin:6px 0;font-size:14px}
.items{display:flex;flex-wrap:wrap;gap:8px}
.item{border:1px solid #ddd;border-radius:4px;padding:4px;background:#fff;font-size:12px;max-width:100%}
.item.flagged{border:2px solid #d62728}
.items:not(.rows) .item{width:92px;font-size:11px}
.item .meta{color:#333;overflow-wrap:anywhere}
.item.flagged .meta,tr.flagged td{color:#d62728}
img.thumb{width:64px;height:64px;min-width:64px;image-rendering:pixelated;display:block}
.query img.thumb.big{width:96px;height:96px}
.text{font-family:ui-monospace,Menlo,Consolas,monospace;white-space:pre-wrap;word-break:break-word;max-width:560px}
.tok{border-radius:2px}
.tok.off{color:#999}
.items.rows{flex-direction:column}
.tab td{padding:1px 5px;font-size:11px}
img.figure{max-width:100%}
.pos{color:#b2182b}.neg{color:#2166ac}
footer{color:#777;font-size:12px;padding:0 24px 24px}
"""


def find_results(workdir: str | Path) -> Path:
    """The workdir's report artifact (or ``workdir`` itself when it is one)."""
    workdir = Path(workdir)
    if (workdir / MANIFEST).exists():
        return workdir
    if not workdir.is_dir():
        raise ArtifactError(f"{workdir} is not a directory: give the workdir of an infkit run")
    if re.fullmatch(rf"{KIND}-[0-9a-f]{{32}}", workdir.name):  # results, their manifest gone
        raise ArtifactError(
            f"{workdir} has no {MANIFEST}: these results were not committed (a run stopped "
            "while writing them) or the file was removed, so they cannot be verified: run "
            f"`infkit run {_run_config(workdir.parent)} --out {workdir.parent}` again"
        )
    found = ArtifactStore(workdir).committed(KIND)
    if not found:
        raise ArtifactError(
            f"{workdir} holds no finished infkit run (no {KIND}-* directory with a manifest): "
            "run `infkit run CONFIG.toml` first, or give its workdir"
        )
    # the newest; one without its manifest (damaged) by its own time, for verify to name it
    newest = max(
        found, key=lambda p: (p / MANIFEST if (p / MANIFEST).exists() else p).stat().st_mtime
    )
    if len(found) > 1:  # (a run removes its older results: these were copied in, a tester's)
        others = ", ".join(p.name for p in found if p != newest)
        warn(
            f"{workdir} holds {len(found)} runs' results: drawing the newest by its files' time, "
            f"{newest.name}; also there: {others}. A run keeps one: the others were copied in "
            "(or left by a run stopped between committing its results and removing the last "
            "ones); delete those you do not want, or give the one to draw (infkit report "
            f"{workdir / newest.name})",
            UserWarning,
        )
    return newest


def load_results(workdir: str | Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The report data and tensors of a run, verified (manifest and checksums)."""
    path = find_results(workdir)
    remedy = (
        "The page cannot be built from it: run "
        f"`infkit run {_run_config(path.parent)} --out {path.parent}` again to recompute the "
        "results (it replaces them)"
    )
    artifact = ArtifactStore(path.parent).verify(path, KIND, remedy=remedy)
    return artifact.json("report"), artifact.tensors("scores")


def _run_config(workdir: Path) -> str:
    """The config file the run of ``workdir`` was made from (its settings record it), else a
    placeholder."""
    try:
        named = json.loads((workdir / "settings.json").read_text()).get("config")
    except (OSError, ValueError, AttributeError):
        named = None
    return str(named) if named else "CONFIG.toml"


def write_report(workdir: str | Path, out: str | Path | None = None) -> Path:
    """Build ``report.html`` from a run's results; returns its path.

    Args:
        workdir: the run's workdir (or its report artifact directory).
        out: where to write the page (default: ``report.html`` in the workdir).
    """
    path = find_results(workdir)
    data, tensors = load_results(path)
    # the footer names the workdir the page is built from (a copy's, not the run's own)
    data["summary"]["workdir"] = str(path.parent)
    target = Path(out) if out is not None else path.parent / "report.html"
    page = render(data, tensors)
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        tmp.write_text(page, encoding="utf-8")
        tmp.replace(target)
    except OSError as error:  # (a workdir one may read, not write: a tester's traceback)
        raise InvalidInputError(
            f"cannot write the report to {target} ({error.strerror or type(error).__name__}): "
            "give --out FILE (out= in Python) in a folder this process can write in"
        ) from error
    return target


# ---------------------------------------------------------------------------- pieces
def esc(value: Any) -> str:
    """HTML-escaped text of a value."""
    return html.escape(str(value), quote=True)


def fmt(value: Any) -> str:
    """A number in a short, exact-enough form (others as text)."""
    if isinstance(value, bool) or value is None:
        return esc(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value == 0 or math.isnan(value) or math.isinf(value):
            return esc(value)
        return f"{value:.4g}" if 1e-3 <= abs(value) < 1e5 else f"{value:.3e}"
    return esc(value)


def figure(fig: Any, alt: str) -> str:
    """A matplotlib figure as an inline PNG."""
    data = base64.b64encode(plot.png(fig)).decode("ascii")
    return f'<img class="figure" alt="{esc(alt)}" src="data:image/png;base64,{data}">'


def _color(score: float, scale: float) -> str:
    """Background of a token: red for a positive contribution, blue for a negative one."""
    alpha = 0.0 if scale <= 0 else min(1.0, abs(score) / scale) * 0.85
    rgb = "214,39,40" if score > 0 else "33,102,172"
    return f"rgba({rgb},{alpha:.2f})"


def view_html(view: dict[str, Any], big: bool = False) -> str:
    """One example's view: a thumbnail, a text (with per-token colours) or a small table."""
    kind = view.get("kind")
    if kind == "image":
        cls = "thumb big" if big else "thumb"
        return f'<img class="{cls}" alt="example" src="{esc(view["png"])}">'
    if kind == "text":
        if "tokens" not in view:
            return f'<div class="text">{esc(view.get("text", ""))}</div>'
        tokens, scored = view["tokens"], view.get("scored") or [True] * len(view["tokens"])
        weights = view.get("token_scores")
        scale = max((abs(w) for w in weights), default=0.0) if weights else 0.0
        spans = []
        for i, token in enumerate(tokens):
            cls = "tok" if i >= len(scored) or scored[i] else "tok off"
            if weights is not None and i < len(weights):
                spans.append(
                    f'<span class="{cls}" style="background:{_color(weights[i], scale)}" '
                    f'title="{weights[i]:+.3e}">{esc(token)}</span>'
                )
            else:
                spans.append(f'<span class="{cls}">{esc(token)}</span>')
        split = ""
        if weights is not None and "token_rest" in view:
            whose = "IF's split: " if "token_total" in view else ""  # lists by another estimator
            split = (
                f'<div class="note">{whose}tokens sum {sum(weights):+.3e}; rest (not by '
                f"position) {view['token_rest']:+.3e}</div>"
            )
        return f'<div class="text">{" ".join(spans)}</div>{split}'
    if kind == "tabular":
        names = "".join(f"<th>{esc(n)}</th>" for n in view["names"])
        values = "".join(f'<td class="num">{fmt(v)}</td>' for v in view["values"])
        more = f'<span class="note">+{view["more"]} more</span>' if view.get("more") else ""
        return f'<table class="tab"><tr>{names}</tr><tr>{values}</tr></table>{more}'
    return f'<span class="note">{esc(kind)}</span>'


def _flags(tensors: dict[str, Tensor]) -> set[int]:
    flagged = tensors.get("flagged")
    return set() if flagged is None else {int(i) for i in flagged.nonzero().reshape(-1)}


def item_html(item: dict[str, Any], flags: set[int], kind: str) -> str:
    """A ranked training example: its view, index, label and score."""
    flagged = item["index"] in flags
    label = f" · y={esc(item['label'])}" if item.get("label") else ""
    mark = "<br>flagged" if flagged else ""
    cls = "item flagged" if flagged else "item"
    sign = "pos" if item["score"] > 0 else "neg"
    return (
        f'<div class="{cls}" data-kind="{kind}" data-index="{item["index"]}">{view_html(item["view"])}'
        f'<div class="meta">#{item["index"]}{label}<br>'
        f'<span class="{sign}">{item["score"]:+.3e}</span>{mark}</div></div>'
    )


def tabular_list_html(
    query: dict[str, Any], items: list[dict[str, Any]], flags: set[int], kind: str
) -> str:
    """Ranked tabular examples as one table under a row with the query's own values."""
    names = "".join(f"<th>{esc(n)}</th>" for n in query["names"])
    head = f"<tr><th>#</th><th>y</th><th>score</th>{names}</tr>"
    first = "".join(f'<td class="num">{fmt(v)}</td>' for v in query["values"])
    rows = [f'<tr class="query-row"><td>query</td><td></td><td></td>{first}</tr>']
    for item in items:
        flagged = item["index"] in flags
        values = "".join(f'<td class="num">{fmt(v)}</td>' for v in item["view"]["values"])
        sign = "pos" if item["score"] > 0 else "neg"
        rows.append(
            f'<tr class="item-row{" flagged" if flagged else ""}" data-kind="{kind}" '
            f'data-index="{item["index"]}"><td class="num">#{item["index"]}</td>'
            f'<td>{esc(item.get("label", ""))}</td><td class="num {sign}">{item["score"]:+.3e}'
            f"</td>{values}</tr>"
        )
    return f'<div class="scroll"><table class="tab">{head}{"".join(rows)}</table></div>'


def table(rows: list[tuple[str, Any]]) -> str:
    """A two-column key/value table."""
    body = "".join(f"<tr><th>{esc(k)}</th><td>{fmt(v)}</td></tr>" for k, v in rows)
    return f'<div class="scroll"><table>{body}</table></div>'


def warnings_list(shown: list[dict[str, str]]) -> str:
    """What the run warned about, as its console showed it, and what the fit it reloaded warned
    about: warnings first, then the notices (what infkit decided for you)."""
    if not shown:
        return ""

    def said(w: dict[str, str]) -> str:  # a reloaded fit's warnings say so
        where = f' <span class="note">(given by {esc(w["from"])})</span>' if "from" in w else ""
        return esc(w["message"]) + where

    once: dict[tuple[str, str], dict[str, str]] = {}  # a warning given again: listed once
    for w in shown:
        once.setdefault((w["category"], w["message"]), w)
    notices = [w for w in once.values() if w["category"] == "Notice"]
    warned = [w for w in once.values() if w["category"] != "Notice"]
    out = ""
    if warned:
        out += f"<h3>Warnings ({len(warned)})</h3>" + "".join(
            f'<p class="warning"><b>{esc(w["category"])}:</b> {said(w)}</p>' for w in warned
        )
    if notices:
        out += f"<h3>Notices ({len(notices)})</h3>" + "".join(
            f'<p class="notice">{said(w)}</p>' for w in notices
        )
    return out


# ---------------------------------------------------------------------------- sections
def summary_section(data: dict[str, Any]) -> str:
    """The run's warnings and notices; model size, data sizes, method, estimator, damping,
    stationarity, diagnostics, timings."""
    s = data["summary"]
    rows = [
        ("model", s["model"]),
        ("parameters (attributed)", f"{s['parameters']:,} ({s['attributed_parameters']:,})"),
        ("training examples", s["n_train"]),
        ("test examples", s["n_test"]),
        ("task", s["task"]),
        ("method", s["method"]),
        ("estimator", s["estimator"]),
        ("l2", s["l2"]),
        ("damping", s["damping"]),
        ("stationarity ||grad L|| (relative)", s["stationarity"]),
        ("fitted or reloaded", s["influence"]),
        ("infkit / torch", f"{s['infkit']} / {s['torch']}"),
    ]
    if "measurement" in s:  # (results of runs before it was kept: the loss, or unsaid)
        rows.insert(5, ("measurement (what the scores change)", _measured(s)))
    auto = s["describe"].get("auto")
    if auto:
        rows.insert(7 if "measurement" in s else 6, ("method=auto chose", auto.get("reason", auto)))
    diag = s.get("diagnostics") or {}
    diag_rows = [
        (k, v if not isinstance(v, dict) else ", ".join(f"{a}={fmt(b)}" for a, b in v.items()))
        for k, v in diag.items()
    ]
    out = warnings_list(data.get("warnings") or []) + "<h3>Settings</h3>" + table(rows)
    out += "<h3>The method's quality diagnostics</h3>" + (
        table(diag_rows)
        if diag_rows
        else '<p class="note">none reported (an exact solve, or checks that do not apply)</p>'
    )
    out += "<h3>Timings (seconds)</h3>" + table(list(s.get("seconds", {}).items()))
    return out


def _measured(summary: dict[str, Any]) -> str:
    """The run's measurement as the page names it: ``margin (higher is better)``."""
    better = "higher" if summary.get("higher_is_better") else "lower"
    return f"{summary.get('measurement', 'loss')} ({better} is better)"


#: what an empty list of proponents or opponents says (the lists keep their sign only)
NONE_OF_SIGN = {
    "proponent": "no training example is predicted to help this query",
    "opponent": "no training example is predicted to harm this query",
}


def explanations_section(data: dict[str, Any], tensors: dict[str, Tensor]) -> str:
    """Each query with its proponents and opponents by IF and by RelatIF, side by side."""
    flags = _flags(tensors)
    losses = tensors["query_losses"].tolist()
    summary = data["summary"]
    est = summary["estimator"].upper()
    name = summary.get("measurement", "loss")
    worse = "lower" if summary.get("higher_is_better") else "higher"
    parts = [
        "<p>A proponent's removal is predicted to make the query's measurement worse (its "
        f"{esc(name)} {worse}: it helped); an opponent's to make it better. Scores are predicted "
        f"changes of the measured quantity, the {esc(_measured(summary))}, 1/N "
        "included. RelatIF normalises each training example's influence by its own, so the "
        "lists are not dominated by high-loss outliers.</p>"
    ]
    for q, query in enumerate(data["queries"]):
        predicted = f" · predicted {esc(query['predicted'])}" if "predicted" in query else ""
        label = f"y = {esc(query['label'])}" if query.get("label") else ""
        tabular = query["view"].get("kind") == "tabular"
        shown = "" if tabular else view_html(query["view"], big=True)
        head = (
            f'<div class="query-head">{shown}<div>'
            f"<h3>Test example #{query['index']}</h3>{label}{predicted}<br>"
            f"loss {fmt(losses[q])}</div></div>"
        )
        sides = []
        for name, title in (("if", est), ("relatif", "RelatIF")):
            lists = query["lists"].get(name)
            if lists is None:
                sides.append(
                    f'<div class="side"><h4>{title}</h4><p class="note">not available for '
                    "this method</p></div>"
                )
                continue
            rows = "rows" if data["display_kind"] != "image" else ""
            blocks = "".join(
                f"<h4>{title}: {kind}s</h4>"
                + (
                    f'<p class="note">{NONE_OF_SIGN[kind]}</p>'
                    if not lists[kind]
                    else tabular_list_html(query["view"], lists[kind], flags, kind)
                    if tabular
                    else f'<div class="items {rows}">'
                    + "".join(item_html(item, flags, kind) for item in lists[kind])
                    + "</div>"
                )
                for kind in ("proponent", "opponent")
            )
            sides.append(f'<div class="side">{blocks}</div>')
        parts.append(f'<div class="query">{head}<div class="sides">{"".join(sides)}</div></div>')
    return "".join(parts)


def distribution_section(data: dict[str, Any], tensors: dict[str, Tensor]) -> str:
    """The histogram of the queries' scores and |score| against rank on log-log axes, each
    query named by its number in the user's data."""
    names = [f"test #{q['index']}" for q in data["queries"]]
    fig = plot.score_distribution(tensors["scores"], query_names=names)
    return (
        "<p>Scores of every training example for the explained queries. Influence is sparse: "
        "on log-log axes |score| against rank falls like a power law.</p>"
        + figure(fig, "score distribution")
    )


def self_influence_section(data: dict[str, Any], tensors: dict[str, Tensor]) -> str:
    """The training examples ranked by self-influence (mislabel candidates) and detection."""
    si = data.get("self_influence")
    if si is None:
        return '<p class="note">not computed ([self_influence] enabled = false, or the method does not give self-scores)</p>'
    out = ""
    det = si.get("detection")
    if det:
        out += (
            f"<p>Detection of the {det['n_flagged']} flagged training examples: ROC AUC "
            f"<b>{det['self_influence_auc']:.4f}</b> by self-influence, "
            f"{det['loss_auc']:.4f} by the training loss.</p>"
        )
        fig = plot.detection_curve(
            {"self-influence": tensors["self_scores"], "training loss": tensors["train_losses"]},
            tensors["flagged"],
        )
        out += figure(fig, "detection curve")
    flags = _flags(tensors)
    rows = "".join(
        f"<tr{' class=flagged' if r['index'] in flags else ''}><td class=num>{rank}</td>"
        f"<td class=num>#{r['index']}</td><td>{esc(r['label'])}</td>"
        f"<td class=num>{fmt(r['score'])}</td><td class=num>{fmt(r['loss'])}</td>"
        f"<td>{'yes' if r['index'] in flags else ''}</td><td>{view_html(r['view'])}</td></tr>"
        for rank, r in enumerate(si["rows"], start=1)
    )
    out += (
        "<p>The training examples whose removal would most raise their own loss: candidates "
        'for mislabelled or atypical examples.</p><div class="scroll"><table><tr><th>rank</th>'
        "<th>index</th>"
        "<th>label</th><th>self-influence</th><th>training loss</th><th>flagged</th>"
        f"<th>example</th></tr>{rows}</table></div>"
    )
    return out


def groups_section(data: dict[str, Any]) -> str:
    """Each group's predicted joint removal effect on each explained query."""
    groups = data.get("groups")
    if not groups:
        return '<p class="note">no groups given ([group_removal] groups = {name = [indices]})</p>'
    queries = [q["index"] for q in data["queries"]]
    head = "".join(f"<th>test #{t}</th>" for t in queries)
    rows = "".join(
        f"<tr><td>{esc(g['name'])}</td><td class=num>{g['size']}</td>"
        f"<td>{esc(g['estimator'])}</td>"
        + "".join(
            f"<td class=num>{fmt(j)}<br><span class=note>sum {fmt(a)}</span></td>"
            for j, a in zip(g["joint"], g["additive"])
        )
        + "</tr>"
        for g in groups
    )
    notes = "".join(
        f'<p class="note">group {esc(g["name"])}: {esc(g["fallback"])}</p>'
        for g in groups
        if "fallback" in g
    )
    return (
        "<p>Predicted change of each query's measurement when the whole group is removed, by "
        "the estimator named in its row, above the sum of the members' single scores.</p>"
        '<div class="scroll"><table><tr><th>group</th><th>size</th><th>estimator</th>'
        f"{head}</tr>{rows}</table></div>" + notes
    )


def retraining_section(data: dict[str, Any], tensors: dict[str, Tensor]) -> str:
    """Predicted against actual leave-one-out change with y = x; a warning first when some
    retrainings did not converge (their changes, and the correlations, are not ground truth)."""
    r = data.get("retraining")
    if r is None:
        return '<p class="note">no retraining check ran ([retraining] n = 20 runs one)</p>'
    fig = plot.loo_scatter(
        tensors["loo_predicted"],
        tensors["loo_actual"],
        title=f"test #{r['query']}: {r['n']} leave-one-out retrainings",
    )
    return (
        not_converged_html(r)
        + start_moved_html(r)
        + moved_far_html(r)
        + f"<p>The {r['n']} training examples with the largest |score| for test example "
        f"#{r['query']}, each left out and the model retrained (largest final gradient norm "
        f"{fmt(r['max_gradient_norm'])}): Pearson <b>{r['pearson']:.4f}</b>, Spearman "
        f"<b>{r['spearman']:.4f}</b>.</p>" + figure(fig, "predicted against actual")
    )


def not_converged_html(r: dict[str, Any]) -> str:
    """The warning of a retraining check whose retrainings stopped short of their tolerance
    (empty when all converged, or for results written before convergence was recorded)."""
    late = r.get("not_converged")
    if not late:
        return ""
    worst, which = worst_norm(late)
    removals = [x for x in late if x["index"] is not None]
    also = (
        " and the retraining on all the data that their changes are measured from"
        if len(removals) < len(late)
        else ""
    )
    counted = f"{len(removals)} of the {r['n']} retrainings{also}"
    if also and not removals:
        counted = "the retraining on all the data that the changes are measured from"
    return (
        f'<p class="warning"><b>The retrained models did not converge:</b> {counted} did '
        f"not reach their tolerance ([retraining] max_iter = "
        f"{r['max_iter']}; largest final gradient norm "
        f"{fmt(worst['gradient_norm'])}, {which}, against a target of {fmt(worst['target'])}, from "
        f"tolerance = {fmt(r['tolerance'])}). Their actual changes are not those of the "
        "retrained optimum, so the correlations below are <b>not ground truth</b>. Raise "
        "[retraining] max_iter and run again; if the gradient norm stalls instead, loosen "
        "tolerance (a float32 model stops near its precision) or train the model closer to "
        "its optimum, from which each retraining starts.</p>"
    )


def start_moved_html(r: dict[str, Any]) -> str:
    """The warning of a retraining check on a model away from its optimum (empty when it was
    there, or for results without the figure)."""
    ratio = r.get("start_move_ratio")
    if ratio is None or not ratio > START_MOVE:
        return ""
    return (
        '<p class="warning"><b>The model is not at its optimum:</b> retraining on all the '
        f"training data moved its parameters by {fmt(r['start_move'])}, {fmt(ratio)} times "
        "the median leave-one-out change. Each actual change below is measured from that "
        "retrained model, so it is the removal's own, while the scores describe the model "
        "given, another point. Train the model to its optimum and run again.</p>"
    )


def moved_far_html(r: dict[str, Any]) -> str:
    """The warning of a retraining check some of whose retrainings moved the parameters far
    beyond the estimator's step (empty when none did, or for results without the figures)."""
    far = r.get("moved_far")
    if not far:
        return ""
    names = ", ".join(retraining_name(x) for x in far)
    without = r.get("pearson_without_far")
    rest = (
        f" Without them, Pearson <b>{without:.4f}</b> over the other {r['n'] - len(far)}."
        if without is not None
        else ""
    )
    return (
        f'<p class="warning"><b>Retrainings that left the linear regime:</b> without {names} '
        f"the parameters moved {value_range([x['moved'] for x in far], '.1f')} times as far "
        "as the estimator's step, at a cosine of "
        f"{value_range([x['cosine'] for x in far], '.2f')} to it "
        f"(loo.csv: moved, cosine). {html.escape(far_reading(far, r))}{rest}</p>"
    )


def layers_section(data: dict[str, Any]) -> str:
    """Each layer's share of the explained queries' |score| mass."""
    layers = data.get("layers")
    if not layers:
        return '<p class="note">not computed (the method does not split scores by module, or [layers] enabled = false)</p>'
    fig = plot.layer_bars(layers, title="share of the queries' |IF score| mass per layer")
    return figure(fig, "per-layer scores")


def warned_line(data: dict[str, Any]) -> str:
    """A line under the title pointing to the run's warnings, when there are any."""
    count = len({w["message"] for w in data.get("warnings") or [] if w["category"] != "Notice"})
    if not count:
        return ""
    return (
        f'<p class="alert"><a href="#summary">{count} warning{"s" * (count != 1)}</a> during '
        "the run: read them before the scores</p>"
    )


def render(data: dict[str, Any], tensors: dict[str, Tensor]) -> str:
    """The whole page."""
    bodies = {
        "summary": summary_section(data),
        "explanations": explanations_section(data, tensors),
        "distribution": distribution_section(data, tensors),
        "self-influence": self_influence_section(data, tensors),
        "group-removal": groups_section(data),
        "retraining": retraining_section(data, tensors),
        "layers": layers_section(data),
    }
    nav = "".join(f'<a href="#{sid}">{esc(title)}</a>' for sid, title in SECTIONS)
    sections = "".join(
        f'<section id="{sid}"><h2>{esc(title)}</h2>{bodies[sid]}</section>'
        for sid, title in SECTIONS
    )
    s = data["summary"]
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    csp = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{csp}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(data['title'])}: infkit report</title><style>{CSS}</style></head><body>"
        f"<header><h1>{esc(data['title'])}</h1><p>{esc(s['model'])}, {s['n_train']:,} "
        f"training examples, method {esc(s['method'])}, estimator {esc(s['estimator'])}</p>"
        f"{warned_line(data)}</header><nav>{nav}</nav><main>{sections}</main>"
        f"<footer>infkit {esc(s['infkit'])} · built {when} from {esc(s['workdir'])}</footer>"
        "</body></html>\n"
    )
