"""The building blocks of report.html: one self-contained page (inline CSS, inline SVG charts), tables with a
row saying where each column's figures come from, and line and bar charts drawn as plain SVG.

No network, no scripts, no external reference: the file opens in any browser, offline, and prints. Every
text is escaped here, so callers pass plain strings; output is deterministic (same input, same bytes).
"""

import math
from collections.abc import Sequence
from html import escape

# matplotlib's tab10 (the PNG plots' colours, so a run looks the same in both), then tab20's light tones.
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22")
COLORS += ("#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#c7c7c7")
COLORS += ("#dbdb8d", "#9edae5")
# Where a figure comes from, in the words the terminal uses; every table's second header row says one.
COMPILED, LIVE, LAYOUT, THEORY, MEASURED = "compiled program", "live arrays", "layout", "theory", "measured"
MAX_POINTS = 2000  # per curve: a long run's polyline is thinned by a stride (its last point always kept)

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif;
  color: #222; max-width: 1280px; margin: 2em auto; padding: 0 1.5em; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; margin-top: 2em; }
h3 { margin: 1.4em 0 0.4em; font-size: 1.05em; }
p.lead { color: #555; margin-top: 0; } p.note, ul.notes { color: #555; font-size: 0.9em; margin: 0.4em 0; }
ul.notes { padding-left: 1.2em; } code { font-size: 0.92em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.92em; }
caption { text-align: left; font-weight: 600; padding: 0.2em 0; }
th, td { padding: 0.25em 0.6em; border-bottom: 1px solid #e4e4e4; vertical-align: top; }
th { text-align: left; border-bottom: 2px solid #999; white-space: nowrap; }
tr.src th { font-weight: normal; font-style: italic; color: #777; font-size: 0.85em; white-space: normal;
  border-bottom: 1px solid #999; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tbody tr:nth-child(even) { background: #f7f7f7; } tr.off td { background: #fff4e0; }
td.bad { color: #b00020; font-weight: 600; }
.wide { overflow-x: auto; } figure { margin: 0.8em 0; } figcaption { color: #555; font-size: 0.9em; }
svg text { font: 11px system-ui, sans-serif; fill: #333; }
details summary { cursor: pointer; color: #555; }
@media print { body { max-width: none; margin: 0; font-size: 11px; } h2 { break-after: avoid; }
  table, figure { break-inside: avoid; } .wide { overflow: visible; }
  * { -webkit-print-color-adjust: exact; print-color-adjust: exact; } }
"""


def page(title: str, body: Sequence[str]) -> str:
    """The whole document: UTF-8, inline style, `body`'s parts (already HTML) in order."""
    head = (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
    )
    return head + "\n".join(body) + "\n</body>\n</html>\n"


def heading(text: str, level: int = 2, anchor: str | None = None) -> str:
    """<h2> (or another level) with an optional id to link to."""
    ident = f' id="{escape(anchor)}"' if anchor else ""
    return f"<h{level}{ident}>{escape(text)}</h{level}>"


def para(text: str, cls: str = "note") -> str:
    """A paragraph of plain text."""
    return f'<p class="{cls}">{escape(text)}</p>'


def notes(lines: Sequence[str]) -> str:
    """Footnotes under a table, one item a line."""
    return '<ul class="notes">' + "".join(f"<li>{escape(line)}</li>" for line in lines) + "</ul>"


def table(
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    sources: Sequence[str] | None = None,
    text_columns: Sequence[int] = (0,),
    ident: str | None = None,
    caption: str | None = None,
    row_classes: Sequence[str] | None = None,
) -> str:
    """A table of text cells; columns not in `text_columns` are right-aligned figures. `sources`, one per
    column, is a second header row saying where each column's figures come from ("" for none)."""
    text = set(text_columns)
    align = lambda i: "" if i in text else ' class="num"'
    out = ['<div class="wide"><table' + (f' id="{escape(ident)}"' if ident else "") + ">"]
    if caption:
        out.append(f"<caption>{escape(caption)}</caption>")
    out.append("<thead><tr>" + "".join(f"<th{align(i)}>{escape(h)}</th>" for i, h in enumerate(header)))
    if sources:
        out.append(
            '</tr><tr class="src">'
            + "".join(f"<th{align(i)}>{escape(s)}</th>" for i, s in enumerate(sources))
        )
    out.append("</tr></thead><tbody>")
    for n, row in enumerate(rows):
        cls = row_classes[n] if row_classes else ""
        out.append(f'<tr class="{cls}">' if cls else "<tr>")
        for i, cell in enumerate(row):
            bad = ' class="num bad"' if cell in ("NO", "DISAGREES") else align(i)
            out.append(f"<td{bad}>{escape(str(cell))}</td>")
        out.append("</tr>")
    return "".join(out) + "</tbody></table></div>"


def table_section(title: str, anchor: str, header, rows, text: str, **table_options) -> list[str]:
    """A report section of one table: its heading (linkable by `anchor`), the table, a note under it."""
    return [heading(title, anchor=anchor), table(header, rows, **table_options), para(text)]


def key_values(pairs: dict, caption: str | None = None, ident: str | None = None) -> str:
    """A two-column table: name, value (values shown as text; None as "null", as results.json says)."""
    show = lambda v: "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)
    rows = [[str(k), show(v)] for k, v in pairs.items()]
    return table(["field", "value"], rows, text_columns=(0, 1), ident=ident, caption=caption)


def meta_section(meta: dict) -> list[str]:
    """results.json's "meta" (machine, jax, processes, the command with its flags, date) as a section."""
    return [heading("Where and how it ran", anchor="meta"), key_values(meta, ident="meta")]


def details(summary: str, inner: str) -> str:
    """A folded block (open it to read; `inner` is HTML)."""
    return f"<details><summary>{escape(summary)}</summary>{inner}</details>"


def figure(svg: str, caption: str) -> str:
    """An inline chart with its caption."""
    return f"<figure>{svg}<figcaption>{escape(caption)}</figcaption></figure>"


def _svg(width: int, height: float, title: str, parts: Sequence[str]) -> str:
    """An inline <svg> element (HTML5 needs no namespace attribute) holding `parts`."""
    head = f'<svg role="img" width="{width}" height="{height:.0f}" viewBox="0 0 {width} {height:.0f}">'
    return head + f"<title>{escape(title)}</title>" + "".join(parts) + "</svg>"


def _nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2, 5 x 10^k apart) covering [low, high]."""
    if not high > low:
        return [low]
    raw = (high - low) / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.floor(low / step) * step
    ticks = [first + i * step for i in range(int(math.ceil((high - first) / step)) + 1)]
    return [round(t, 12) for t in ticks]


def _label(value: float) -> str:
    return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3g}"


def _legend(names: Sequence[str], top: float, left: float, width: float) -> tuple[str, float]:
    """Swatch-and-name items below a chart, flowing left to right within `width`; returns (svg, height)."""
    out, x, y = [], left, top
    for i, name in enumerate(names):
        room = 30 + 7 * len(name)  # swatch, gaps and the name at about 7 px a character
        if x > left and x + room > width:
            x, y = left, y + 16
        color = COLORS[i % len(COLORS)]
        out.append(f'<rect x="{x:.0f}" y="{y - 8}" width="14" height="8" fill="{color}"/>')
        out.append(f'<text x="{x + 20:.0f}" y="{y}">{escape(name)}</text>')
        x += room
    return "".join(out), y - top + 16


def line_chart(
    series: dict[str, Sequence[tuple[float, float | None]]],
    xlabel: str,
    ylabel: str,
    log_y: bool = False,
    width: int = 720,
    height: int = 300,
) -> str:
    """Each named series of (x, y) points as a polyline on shared axes; a None, NaN, inf (or, on a log
    axis, a value <= 0) breaks the line there. A series of one point is drawn as a dot."""
    ok = lambda y: y is not None and math.isfinite(y) and (y > 0 or not log_y)
    points = {name: [(x, y) for x, y in pts] for name, pts in series.items()}
    xs = [x for pts in points.values() for x, _ in pts]
    ys = [y for pts in points.values() for _, y in pts if ok(y)]
    if not xs or not ys:
        return f"<p class='note'>{escape(ylabel)}: no finite values to draw</p>"
    left, right, top, bottom = 64, 16, 12, 42
    plot_w, plot_h = width - left - right, height - top - bottom
    fy = math.log10 if log_y else float
    x0, x1 = min(xs), max(xs)
    y0, y1 = fy(min(ys)), fy(max(ys))
    if y1 - y0 < 1e-12:  # a flat curve: give it a band around its value
        y0, y1 = y0 - (abs(y0) * 0.05 or 1), y1 + (abs(y1) * 0.05 or 1)
    y0, y1 = y0 - 0.04 * (y1 - y0), y1 + 0.04 * (y1 - y0)  # the curves clear the frame
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    sx = lambda x: left + (x - x0) / (x1 - x0) * plot_w
    sy = lambda y: top + (1 - (fy(y) - y0) / (y1 - y0)) * plot_h
    out = [
        f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#999"/>',
    ]
    if log_y and y1 - y0 > math.log10(20):
        yticks = [10.0**k for k in range(math.ceil(y0), math.floor(y1) + 1)]
    else:
        yticks = [t for t in _nice_ticks(10**y0 if log_y else y0, 10**y1 if log_y else y1) if ok(t)]
    for t in yticks:
        if y0 - 1e-9 <= fy(t) <= y1 + 1e-9:
            y = f"{sy(t):.1f}"
            out.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y}" y2="{y}" stroke="#eee"/>')
            out.append(f'<text x="{left - 6}" y="{y}" text-anchor="end" dy="4">{_label(t)}</text>')
    for t in _nice_ticks(x0, x1, 8):
        if x0 <= t <= x1:
            x = f"{sx(t):.1f}"
            out.append(f'<line x1="{x}" x2="{x}" y1="{top + plot_h}" y2="{top + plot_h + 4}" stroke="#999"/>')
            out.append(f'<text x="{x}" y="{top + plot_h + 16}" text-anchor="middle">{_label(t)}</text>')
    out.append(
        f'<text x="{left + plot_w / 2}" y="{top + plot_h + 34}" text-anchor="middle">{escape(xlabel)}</text>'
    )
    out.append(
        f'<text transform="translate(14 {top + plot_h / 2}) rotate(-90)" text-anchor="middle">'
        f"{escape(ylabel + (' (log scale)' if log_y else ''))}</text>"
    )
    for i, pts in enumerate(points.values()):
        color = COLORS[i % len(COLORS)]
        stride = max(1, math.ceil(len(pts) / MAX_POINTS))
        thinned = pts[::stride] + ([pts[-1]] if (len(pts) - 1) % stride else [])
        segments, current = [], []
        for x, y in thinned:
            if ok(y):
                current.append(f"{sx(x):.1f},{sy(y):.1f}")
            elif current:
                segments, current = [*segments, current], []
        segments += [current] if current else []
        for seg in segments:
            if len(seg) == 1:
                cx, cy = seg[0].split(",")
                out.append(f'<circle cx="{cx}" cy="{cy}" r="3" fill="{color}"/>')
            else:
                out.append(
                    f'<polyline fill="none" stroke="{color}" stroke-width="1.6" points="{" ".join(seg)}"/>'
                )
    legend, extra = _legend(list(points), height + 6, left, width)
    return _svg(width, height + extra + 4, f"{ylabel} over {xlabel}", [*out, legend])


def bar_chart(
    rows: Sequence[tuple[str, Sequence[float]]],
    parts: Sequence[str],
    unit: str,
    fmt,
    limit: float | None = None,
    limit_label: str = "",
    width: int = 720,
) -> str:
    """Horizontal stacked bars, one per (label, values by part), against a shared axis in `unit` (`fmt`
    writes a value); a dashed line at `limit` when given."""
    label_w = min(360, 7 * max((len(label) for label, _ in rows), default=4) + 12)
    left, right, bar, gap = label_w, 70, 16, 8
    plot_w = width - left - right
    top_value = max([sum(v for v in values if v) for _, values in rows] + [limit or 0]) or 1
    sx = lambda v: left + v / top_value * plot_w
    height = len(rows) * (bar + gap) + 10
    out = []
    for n, (label, values) in enumerate(rows):
        y, at = 4 + n * (bar + gap), 0.0
        out.append(f'<text x="{left - 6}" y="{y + bar - 4}" text-anchor="end">{escape(label)}</text>')
        for i, value in enumerate(values):
            if value:
                w = value / top_value * plot_w
                color = COLORS[i % len(COLORS)]
                out.append(f'<rect x="{sx(at):.1f}" y="{y}" width="{w:.1f}" height="{bar}" fill="{color}"/>')
                at += value
        out.append(f'<text x="{sx(at) + 4:.1f}" y="{y + bar - 4}">{escape(fmt(at))}</text>')
    if limit:
        x = f"{sx(limit):.1f}"
        out.append(f'<line x1="{x}" x2="{x}" y1="0" y2="{height - 6}" stroke="#000" stroke-dasharray="4 3"/>')
        out.append(f'<text x="{x}" y="{height + 6}" text-anchor="middle">{escape(limit_label)}</text>')
        height += 12
    legend, extra = _legend(parts, height + 10, 10, width)
    return _svg(width, height + extra + 6, unit, [*out, legend])
