"""Charts as inline SVG, drawn on the server: no script, no build step, readable without JavaScript."""

from __future__ import annotations

from datetime import UTC, datetime
from html import escape

WIDTH, HEIGHT = 760, 240
LEFT, RIGHT, TOP, BOTTOM = 56, 190, 28, 34
PALETTE = ("#2563eb", "#dc2626", "#16a34a", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#65a30d", "#475569")


def _frame(title: str, body: list[str], legend: list[tuple[str, str]]) -> str:
    parts = [
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{escape(title)}" '
        f'xmlns="http://www.w3.org/2000/svg">',
        f'<text x="{LEFT}" y="18" class="chart-title">{escape(title)}</text>',
    ]
    parts += body
    for i, (name, color) in enumerate(legend):
        y = TOP + 8 + i * 18
        parts.append(
            f'<rect x="{WIDTH - RIGHT + 14}" y="{y - 9}" width="11" height="11" fill="{color}"/>'
            f'<text x="{WIDTH - RIGHT + 30}" y="{y}" class="chart-legend">{escape(name)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _empty(title: str) -> str:
    return _frame(title, [f'<text x="{WIDTH / 2 - 60}" y="{HEIGHT / 2}" class="chart-empty">no data yet</text>'], [])


def _axes(top_value: float, labels: list[tuple[float, str]], unit: float | None) -> list[str]:
    plot_h = HEIGHT - TOP - BOTTOM
    out = [f'<line x1="{LEFT}" y1="{HEIGHT - BOTTOM}" x2="{WIDTH - RIGHT}" y2="{HEIGHT - BOTTOM}" class="axis"/>']
    for fraction in (0, 0.5, 1):
        y = HEIGHT - BOTTOM - fraction * plot_h
        value = top_value * fraction
        text = f"{value:.0%}" if unit == 1.0 else f"{value:,.0f}"
        out.append(
            f'<line x1="{LEFT}" y1="{y:.1f}" x2="{WIDTH - RIGHT}" y2="{y:.1f}" class="grid"/>'
            f'<text x="{LEFT - 6}" y="{y + 4:.1f}" class="tick" text-anchor="end">{text}</text>'
        )
    for x, text in labels:
        out.append(
            f'<text x="{x:.1f}" y="{HEIGHT - BOTTOM + 16}" class="tick" text-anchor="middle">{escape(text)}</text>'
        )
    return out


def _time_labels(times_ms: list[int], xs: list[float], count: int = 6) -> list[tuple[float, str]]:
    if not times_ms:
        return []
    step = max(-(-len(times_ms) // count), 1)  # at most `count` labels: they must not overlap
    span = times_ms[-1] - times_ms[0]
    fmt = "%H:%M:%S" if span < 3_600_000 else "%m-%d %H:%M" if span < 3 * 86_400_000 else "%Y-%m-%d"
    return [(xs[i], datetime.fromtimestamp(times_ms[i] / 1000, UTC).strftime(fmt)) for i in range(0, len(xs), step)]


def stacked_bars(times_ms: list[int], series: dict[str, list[int]], *, title: str) -> str:
    if not times_ms or not series:
        return _empty(title)
    totals = [sum(values[i] for values in series.values()) for i in range(len(times_ms))]
    top = max(max(totals), 1)
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    slot = plot_w / len(times_ms)
    body, legend = [], []
    base = [0] * len(times_ms)
    for n, (name, values) in enumerate(sorted(series.items())):
        color = PALETTE[n % len(PALETTE)]
        legend.append((name, color))
        for i, value in enumerate(values):
            if not value:
                continue
            h = value / top * plot_h
            y = HEIGHT - BOTTOM - base[i] / top * plot_h - h
            body.append(
                f'<rect x="{LEFT + i * slot + 1:.1f}" y="{y:.1f}" width="{max(slot - 2, 1):.1f}" height="{h:.1f}" '
                f'fill="{color}"><title>{escape(name)}: {value:,}</title></rect>'
            )
            base[i] += value
    xs = [LEFT + (i + 0.5) * slot for i in range(len(times_ms))]
    return _frame(title, _axes(top, _time_labels(times_ms, xs), None) + body, legend)


def lines(times_ms: list[int], series: dict[str, list[float | None]], *, title: str, unit: float | None = None) -> str:
    values = [v for vs in series.values() for v in vs if v is not None]
    if len(times_ms) < 1 or not values:
        return _empty(title)
    top = unit if unit is not None else max(max(values), 1)
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    first, span = times_ms[0], max(times_ms[-1] - times_ms[0], 1)
    xs = [LEFT + (t - first) / span * plot_w if len(times_ms) > 1 else LEFT + plot_w / 2 for t in times_ms]
    body, legend = [], []
    for n, (name, ys) in enumerate(series.items()):
        color = PALETTE[n % len(PALETTE)]
        legend.append((name, color))
        points = [(x, HEIGHT - BOTTOM - v / top * plot_h) for x, v in zip(xs, ys) if v is not None]
        if len(points) > 1:
            body.append(
                f'<polyline fill="none" stroke="{color}" stroke-width="2.5" points="'
                + " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
                + '"/>'
            )
        for (x, y), v in zip(points, [v for v in ys if v is not None]):
            label = f"{v:.1%}" if unit == 1.0 else f"{v:,.0f}"
            body.append(
                f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3.5" fill="{color}"><title>{escape(name)}: {label}</title></circle>'
            )
    return _frame(title, _axes(top, _time_labels(times_ms, xs), unit) + body, legend)
