"""The graph drawn as a self-contained SVG (no script, no font or style sheet from the network),
for viewers that render no Mermaid: MLflow's artifact viewer shows ``graph.svg`` beside the
Mermaid source ``graph.mmd`` (:func:`resalign.graph.plan.render_mermaid`).

Layout: a layered drawing left to right. A node's column is its longest path from a node
without dependencies; within a column nodes are ordered by the mean position of their
dependencies (two sweeps, the usual barycenter heuristic), which keeps each row's chain of
unlearning, attack segments and evaluations on one band. Edges are curves from a dependency's
right side to the dependant's left side.
"""

from __future__ import annotations

from html import escape

from .nodes import Graph
from .plan import short_key

# Box fill per node kind; other kinds are grey.
_FILL = {
    "model": "#dbeafe",
    "harvest": "#e0e7ff",
    "unlearn": "#fde68a",
    "attack": "#fecaca",
    "evaluate": "#bbf7d0",
    "report": "#e9d5ff",
}
_CHAR_W, _BOX_H, _ROW_H, _COL_GAP, _PAD = 7.4, 34, 44, 56, 16


def _columns(graph: Graph) -> list[list[str]]:
    depth: dict[str, int] = {}
    for node in graph:  # topological order: every dependency already has its depth
        depth[node.name] = 1 + max((depth[d] for d in node.deps.values()), default=-1)
    cols: list[list[str]] = [[] for _ in range(max(depth.values(), default=-1) + 1)]
    for node in graph:
        cols[depth[node.name]].append(node.name)
    # barycenter ordering, two sweeps over the columns
    for _ in range(2):
        pos = {n: i for col in cols for i, n in enumerate(col)}
        for col in cols[1:]:
            col.sort(
                key=lambda n: (
                    sum(pos[d] for d in graph[n].deps.values()) / max(len(graph[n].deps), 1)
                )
            )
            pos.update({n: i for i, n in enumerate(col)})
    return cols


def render_svg(graph: Graph) -> str:
    """The graph as one SVG document: a box per node (name; kind and short key below,
    coloured by kind; the full key as its tooltip) and an arrow per dependency."""
    cols = _columns(graph)
    # box width of each column: the longest name (12 px) or kind-and-key line (10 px)
    widths = [
        max(
            max(
                len(n) * _CHAR_W,
                (len(graph[n].kind) + 1 + len(short_key(graph[n]))) * _CHAR_W * 0.9,
            )
            for n in col
        )
        + 20
        for col in cols
    ]
    xs, x = [], float(_PAD)
    for w in widths:
        xs.append(x)
        x += w + _COL_GAP
    width = x - _COL_GAP + _PAD
    height = _PAD * 2 + max((len(c) for c in cols), default=1) * _ROW_H
    place: dict[str, tuple[float, float, float]] = {}
    for ci, col in enumerate(cols):
        top = _PAD + (height - 2 * _PAD - len(col) * _ROW_H) / 2
        for i, name in enumerate(col):
            place[name] = (xs[ci], top + i * _ROW_H, widths[ci])
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
        f'viewBox="0 0 {width:.0f} {height:.0f}" font-family="monospace" font-size="12">',
        f"<title>{escape(graph.spec_name)}: {len(graph)} nodes</title>",
        '<defs><marker id="a" viewBox="0 0 8 8" refX="8" refY="4" markerWidth="6" '
        'markerHeight="6" orient="auto"><path d="M0,0 L8,4 L0,8 z" fill="#666"/></marker></defs>',
        f'<rect width="{width:.0f}" height="{height:.0f}" fill="white"/>',
    ]
    for node in graph:
        x1, y1, _ = place[node.name]
        for dep in node.deps.values():
            x0, y0, w0 = place[dep]
            sx, sy, ex, ey = x0 + w0, y0 + _BOX_H / 2, x1, y1 + _BOX_H / 2
            mid = (sx + ex) / 2
            out.append(
                f'<path d="M{sx:.1f},{sy:.1f} C{mid:.1f},{sy:.1f} {mid:.1f},{ey:.1f} '
                f'{ex:.1f},{ey:.1f}" fill="none" stroke="#888" marker-end="url(#a)"/>'
            )
    for node in graph:
        x, y, w = place[node.name]
        fill = _FILL.get(node.kind, "#e5e7eb")
        out.append(
            f"<g><title>{escape(node.name)} ({escape(node.kind)}, key {escape(node.key)})</title>"
            f'<rect x="{x:.1f}" y="{y:.1f}" width="{w:.1f}" height="{_BOX_H}" rx="4" '
            f'fill="{fill}" stroke="#555"/>'
            f'<text x="{x + 10:.1f}" y="{y + 14:.1f}">{escape(node.name)}</text>'
            f'<text x="{x + 10:.1f}" y="{y + 28:.1f}" fill="#555" font-size="10">'
            f"{escape(node.kind)} {escape(short_key(node))}</text></g>"
        )
    out.append("</svg>")
    return "\n".join(out) + "\n"
