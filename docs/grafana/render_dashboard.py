#!/usr/bin/env python3
"""Draws treaty-dashboard.json from scraped /metrics samples, the way Grafana would.

Not Grafana: a stand-in for a machine without it. It reads the dashboard JSON, evaluates
each panel's PromQL over the scrapes (the subset the dashboard uses: selectors with label
matchers, rate() and increase() with Prometheus' extrapolation, sum/max with or without
`by`, histogram_quantile() as Prometheus computes it, and `/` between two vectors), one
evaluation every scrape interval as a range query with that step would, and draws each
panel at its gridPos with its title, unit, thresholds and legend format. A query with no
series draws "No data", as Grafana does; nothing is made up or smoothed.

Input: the scrapes written by record_run.py (xz JSON lines `{"t": unix_ms, "text":
"<Prometheus text exposition>"}`), and optionally its events file, whose outages and
operator actions are drawn as annotations (they are not part of the dashboard JSON) and
whose endpoint lines name the services in the header.

    python3 render_dashboard.py --samples samples.jsonl.xz --events events.json

Needs matplotlib and numpy.
"""

import argparse
import json
import lzma
import math
import re
from datetime import datetime, timezone
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.dates as mdates  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import FancyBboxPatch  # noqa: E402

HERE = Path(__file__).resolve().parent
LOOKBACK_S = 300.0  # Prometheus' default lookback for an instant selector

# ---------------------------------------------------------------- samples

LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)(\s+\S+)?$")
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"\s*,?\s*')


def parse_exposition(text):
    """{(name, ((label, value), ...)): float} of one scrape."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = LINE.match(line)
        if not m:
            continue
        name, _, labels, value = m.group(1), m.group(2), m.group(3), m.group(4)
        pairs = []
        if labels:
            pairs = [(k, bytes(v, "utf-8").decode("unicode_escape")) for k, v in LABEL.findall(labels)]
        out[(name, tuple(sorted(pairs)))] = float(value.replace("+Inf", "inf").replace("-Inf", "-inf"))
    return out


class Samples:
    """Every series as (times in seconds, values), NaN where a scrape did not have it."""

    def __init__(self, path):
        times, scrapes = [], []
        with lzma.open(path, "rt") as f:
            for line in f:
                d = json.loads(line)
                times.append(d["t"] / 1000.0)
                scrapes.append(parse_exposition(d["text"]))
        order = np.argsort(times)
        self.times = np.array(times)[order]
        scrapes = [scrapes[i] for i in order]
        keys = sorted({k for s in scrapes for k in s})
        self.series = {}
        for k in keys:
            self.series[k] = np.array([s.get(k, np.nan) for s in scrapes])
        self.scrape_interval = float(np.median(np.diff(self.times))) if len(self.times) > 1 else 15.0

    def names(self):
        return {k[0] for k in self.series}


# ---------------------------------------------------------------- PromQL subset

TOKEN = re.compile(
    r"\s*(?:(?P<dur>\d+[smhdwy](?![a-zA-Z0-9_]))|(?P<num>\d+(?:\.\d+)?)|(?P<str>\"(?:[^\"\\]|\\.)*\")"
    r"|(?P<op>!=|=~|!~|[(){}\[\],/=])|(?P<id>[a-zA-Z_:][a-zA-Z0-9_:]*))"
)


def tokenize(expr):
    pos, out = 0, []
    expr = expr.strip()
    while pos < len(expr):
        m = TOKEN.match(expr, pos)
        if not m or m.end() == pos:
            raise ValueError(f"cannot parse {expr[pos:]!r} in {expr!r}")
        kind = m.lastgroup
        out.append((kind, m.group(kind)))
        pos = m.end()
    return out


def duration_s(text):
    return float(text[:-1]) * {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}[text[-1]]


class Parser:
    """expr := term ('/' term)* ; term := agg | func | selector | number."""

    AGGS = {"sum", "max", "min", "avg", "count"}
    FUNCS = {"rate", "increase", "histogram_quantile"}

    def __init__(self, expr):
        self.toks = tokenize(expr)
        self.i = 0

    def peek(self, k=0):
        return self.toks[self.i + k] if self.i + k < len(self.toks) else (None, None)

    def take(self, value=None):
        tok = self.peek()
        if value is not None and tok[1] != value:
            raise ValueError(f"expected {value!r}, got {tok[1]!r}")
        self.i += 1
        return tok

    def parse(self):
        node = self.expr()
        if self.i != len(self.toks):
            raise ValueError(f"trailing {self.toks[self.i:]}")
        return node

    def expr(self):
        node = self.term()
        while self.peek()[1] == "/":
            self.take("/")
            node = ("div", node, self.term())
        return node

    def labels_list(self):
        self.take("(")
        labels = []
        while self.peek()[1] != ")":
            labels.append(self.take()[1])
            if self.peek()[1] == ",":
                self.take(",")
        self.take(")")
        return labels

    def term(self):
        kind, value = self.peek()
        if kind == "num":
            self.take()
            return ("num", float(value))
        if value == "(":
            self.take("(")
            node = self.expr()
            self.take(")")
            return node
        if kind == "id" and value in self.AGGS:
            self.take()
            by = None
            if self.peek()[1] == "by":
                self.take()
                by = self.labels_list()
            self.take("(")
            inner = self.expr()
            self.take(")")
            if self.peek()[1] == "by":
                self.take()
                by = self.labels_list()
            return ("agg", value, by, inner)
        if kind == "id" and value in self.FUNCS and self.peek(1)[1] == "(":
            self.take()
            self.take("(")
            args = [self.expr()]
            while self.peek()[1] == ",":
                self.take(",")
                args.append(self.expr())
            self.take(")")
            return ("func", value, args)
        if kind == "id":
            return self.selector()
        raise ValueError(f"unexpected {value!r}")

    def selector(self):
        name = self.take()[1]
        matchers = []
        if self.peek()[1] == "{":
            self.take("{")
            while self.peek()[1] != "}":
                label = self.take()[1]
                op = self.take()[1]
                raw = self.take()[1]
                matchers.append((label, op, json.loads(raw)))
                if self.peek()[1] == ",":
                    self.take(",")
            self.take("}")
        if self.peek()[1] == "[":
            self.take("[")
            rng = duration_s(self.take()[1])
            self.take("]")
            return ("matrix", name, matchers, rng)
        return ("vector", name, matchers)


def matches(labels, matchers):
    d = dict(labels)
    for label, op, value in matchers:
        have = d.get(label, "")
        if op == "=" and have != value:
            return False
        if op == "!=" and have == value:
            return False
        if op == "=~" and not re.fullmatch(value, have):
            return False
        if op == "!~" and re.fullmatch(value, have):
            return False
    return True


def extrapolated(times, values, t, rng, is_rate):
    """Prometheus' extrapolatedRate() for one series at evaluation time t."""
    sel = (times > t - rng) & (times <= t) & ~np.isnan(values)
    ts, vs = times[sel], values[sel]
    if len(ts) < 2:
        return np.nan
    result = vs[-1] - vs[0]
    for prev, cur in zip(vs[:-1], vs[1:]):
        if cur < prev:  # a counter reset
            result += prev
    to_start = ts[0] - (t - rng)
    to_end = t - ts[-1]
    sampled = ts[-1] - ts[0]
    avg = sampled / (len(ts) - 1)
    threshold = avg * 1.1
    interval = sampled
    if to_start >= threshold:
        to_start = avg / 2
    if result > 0 and vs[0] >= 0:
        to_zero = sampled * (vs[0] / result)
        if to_zero < to_start:
            to_start = to_zero
    interval += to_start
    if to_end >= threshold:
        to_end = avg / 2
    interval += to_end
    factor = interval / sampled
    if is_rate:
        factor /= rng
    return result * factor


def bucket_quantile(q, buckets):
    """Prometheus' bucketQuantile(): buckets is [(upper bound, cumulative count)]."""
    if math.isnan(q):
        return np.nan
    if q < 0:
        return -np.inf
    if q > 1:
        return np.inf
    buckets = sorted(buckets)
    if not buckets or not math.isinf(buckets[-1][0]):
        return np.nan
    merged = []
    for ub, c in buckets:  # same upper bound twice: add them
        if merged and merged[-1][0] == ub:
            merged[-1] = (ub, merged[-1][1] + c)
        else:
            merged.append((ub, c))
    fixed, top = [], -np.inf  # ensureMonotonic
    for ub, c in merged:
        top = max(top, c)
        fixed.append((ub, top))
    buckets = fixed
    if len(buckets) < 2:
        return np.nan
    observations = buckets[-1][1]
    if not observations > 0:
        return np.nan
    rank = q * observations
    b = next(i for i, (_, c) in enumerate(buckets) if c >= rank)
    if b == len(buckets) - 1:
        return buckets[-2][0]
    if b == 0 and buckets[0][0] <= 0:
        return buckets[0][0]
    start, end, count = 0.0, buckets[b][0], buckets[b][1]
    if b > 0:
        start = buckets[b - 1][0]
        count -= buckets[b - 1][1]
        rank -= buckets[b - 1][1]
    return start + (end - start) * (rank / count)


class Evaluator:
    """Evaluates a parsed expression at every step: {labels tuple: np.array of len(steps)}."""

    def __init__(self, samples, steps):
        self.s = samples
        self.steps = steps

    def eval(self, node):
        kind = node[0]
        if kind == "num":
            return {(): np.full(len(self.steps), node[1])}
        if kind == "vector":
            _, name, matchers = node
            out = {}
            for (n, labels), values in self.s.series.items():
                if n == name and matches(labels, matchers):
                    out[labels] = self.instant(values)
            return out
        if kind == "func":
            _, fn, args = node
            if fn in ("rate", "increase"):
                m = args[0]
                if m[0] != "matrix":
                    raise ValueError(f"{fn}() needs a range selector")
                _, name, matchers, rng = m
                out = {}
                for (n, labels), values in self.s.series.items():
                    if n == name and matches(labels, matchers):
                        out[labels] = np.array(
                            [extrapolated(self.s.times, values, t, rng, fn == "rate") for t in self.steps]
                        )
                return out  # the metric name is dropped: labels never held it
            if fn == "histogram_quantile":
                q = args[0][1] if args[0][0] == "num" else float("nan")
                inner = self.eval(args[1])
                groups = {}
                for labels, values in inner.items():
                    d = dict(labels)
                    le = d.pop("le", None)
                    if le is None:
                        continue
                    groups.setdefault(tuple(sorted(d.items())), []).append((float(le), values))
                out = {}
                for labels, buckets in groups.items():
                    out[labels] = np.array(
                        [bucket_quantile(q, [(ub, v[i]) for ub, v in buckets if not np.isnan(v[i])])
                         for i in range(len(self.steps))]
                    )
                return out
        if kind == "agg":
            _, op, by, inner = node
            vec = self.eval(inner)
            groups = {}
            for labels, values in vec.items():
                key = tuple((k, v) for k, v in labels if by is not None and k in by)
                groups.setdefault(key, []).append(values)
            out = {}
            for key, members in groups.items():
                stack = np.vstack(members)
                present = ~np.isnan(stack)
                with np.errstate(all="ignore"):
                    if op == "sum":
                        r = np.where(present, stack, 0).sum(axis=0)
                    elif op == "max":
                        r = np.where(present, stack, -np.inf).max(axis=0)
                    elif op == "min":
                        r = np.where(present, stack, np.inf).min(axis=0)
                    elif op == "count":
                        r = present.sum(axis=0).astype(float)
                    else:
                        r = np.where(present, stack, 0).sum(axis=0) / present.sum(axis=0)
                # A step where no member has a value has no result. (NaN stands for "no
                # sample" here: the dashboard aggregates only selectors and rate(), never
                # histogram_quantile()'s NaN answers, so the two cannot be confused.)
                out[key] = np.where(present.any(axis=0), r, np.nan)
            return out
        if kind == "div":
            left, right = self.eval(node[1]), self.eval(node[2])
            out = {}
            for labels, lv in left.items():
                if labels in right:
                    with np.errstate(all="ignore"):
                        out[labels] = lv / right[labels]
            return out
        raise ValueError(f"cannot evaluate {node}")

    def instant(self, values):
        """The latest sample at or before each step, within the lookback."""
        t = self.s.times
        out = np.full(len(self.steps), np.nan)
        valid = ~np.isnan(values)
        vt, vv = t[valid], values[valid]
        idx = np.searchsorted(vt, self.steps, side="right") - 1
        for i, j in enumerate(idx):
            if j >= 0 and self.steps[i] - vt[j] <= LOOKBACK_S:
                out[i] = vv[j]
        return out


def legend_name(fmt, labels, expr):
    d = dict(labels)
    if fmt:
        return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: d.get(m.group(1), ""), fmt).strip()
    if not d:
        return expr
    return "{" + ", ".join(f'{k}="{v}"' for k, v in d.items()) + "}"


# ---------------------------------------------------------------- units and drawing

BG = "#111217"
PANEL = "#181b1f"
BORDER = "#2c3235"
TEXT = "#ccccdc"
MUTED = "#8e8e9e"
GRID = "#2a2d33"
PALETTE = [
    "#73BF69", "#F2CC0C", "#8AB8FF", "#FF780A", "#F2495C", "#5794F2", "#B877D9", "#37872D",
    "#FADE2A", "#447EBC", "#C4162A", "#FF9830", "#1F60C4", "#8F3BB8", "#96D98D", "#FFEE52",
    "#C0D8FF", "#FFB357", "#FF7383", "#CA95E5",
]
THRESHOLD_COLORS = {"green": "#73BF69", "orange": "#FF9830", "red": "#F2495C", "yellow": "#FADE2A"}


def fmt_seconds(v):
    a = abs(v)
    if a == 0:
        return "0 s"
    if a < 1e-6:
        return f"{v * 1e9:.3g} ns"
    if a < 1e-3:
        return f"{v * 1e6:.3g} µs"
    if a < 1:
        return f"{v * 1e3:.3g} ms"
    if a < 60:
        return f"{v:.3g} s"
    if a < 3600:
        return f"{v / 60:.3g} min"
    return f"{v / 3600:.3g} hour"


def fmt_short(v):
    a = abs(v)
    for div, suffix in ((1e9, " Bil"), (1e6, " Mil"), (1e3, " K")):
        if a >= div:
            return f"{v / div:.3g}{suffix}"
    if a == 0:
        return "0"
    if a >= 100:
        return f"{v:.0f}"
    return f"{v:.3g}"


def fmt_value(v, unit):
    if unit == "s":
        return fmt_seconds(v)
    if unit == "ops":
        return fmt_short(v) + " ops/s"
    return fmt_short(v)


def threshold_color(value, thresholds):
    steps = (thresholds or {}).get("steps") or [{"color": "green", "value": None}]
    color = steps[0]["color"]
    for step in steps:
        if step["value"] is None or (value is not None and not np.isnan(value) and value >= step["value"]):
            color = step["color"]
    return THRESHOLD_COLORS.get(color, color)


def evaluate_panel(panel, samples, steps):
    results = []
    for target in panel.get("targets", []):
        expr = target["expr"]
        tree = Parser(expr).parse()
        vec = Evaluator(samples, steps).eval(tree)
        for labels in sorted(vec):
            results.append((legend_name(target.get("legendFormat", ""), labels, expr), vec[labels]))
    return results


def draw_stat(fig, rect, panel, results, steps, unit):
    x, y, w, h = rect
    values = results[0][1] if results else None
    last = None
    if values is not None:
        finite = values[~np.isnan(values)]
        last = float(finite[-1]) if len(finite) else None  # reduceOptions: lastNotNull
    color = threshold_color(last, panel.get("fieldConfig", {}).get("defaults", {}).get("thresholds")) if last is not None else PANEL
    ax = fig.add_axes(rect)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.axis("off")
    ax.add_patch(FancyBboxPatch((0, 0), 1, 1, boxstyle="round,pad=0,rounding_size=0.01",
                                transform=ax.transAxes, facecolor=color, edgecolor=BORDER, lw=0.8))
    title_color = "#111217" if last is not None else TEXT
    ax.text(0.03, 0.93, panel["title"], transform=ax.transAxes, ha="left", va="top",
            fontsize=11, color=title_color, fontweight="bold")
    if last is None:
        ax.text(0.5, 0.45, "No data", transform=ax.transAxes, ha="center", va="center", fontsize=14, color=MUTED)
        return
    # graphMode "area": the sparkline behind the value.
    if panel.get("options", {}).get("graphMode") == "area" and values is not None:
        spark = fig.add_axes([x, y + 0.003, w, h * 0.42])
        spark.axis("off")
        v = np.where(np.isnan(values), np.nan, values)
        top = np.nanmax(v) if np.any(~np.isnan(v)) else 0
        spark.fill_between(steps, v, 0, color="white", alpha=0.18, lw=0, step=None)
        spark.plot(steps, v, color="white", alpha=0.55, lw=1)
        spark.set_xlim(steps[0], steps[-1])
        spark.set_ylim(0, top * 1.05 if top > 0 else 1)
    ax.text(0.5, 0.52, fmt_value(last, unit), transform=ax.transAxes, ha="center", va="center",
            fontsize=30, color="#111217" if color != PANEL else TEXT, fontweight="bold")


def draw_timeseries(fig, rect, panel, results, steps, unit, annotations, tz):
    x, y, w, h = rect
    frame = fig.add_axes(rect)
    frame.axis("off")
    frame.add_patch(FancyBboxPatch((0, 0), 1, 1, boxstyle="round,pad=0,rounding_size=0.01",
                                   transform=frame.transAxes, facecolor=PANEL, edgecolor=BORDER, lw=0.8))
    frame.text(0.012, 0.965, panel["title"], transform=frame.transAxes, ha="left", va="top",
               fontsize=11, color=TEXT, fontweight="bold")
    if not results:
        frame.text(0.5, 0.5, "No data", transform=frame.transAxes, ha="center", va="center", fontsize=14, color=MUTED)
        return
    n = len(results)
    fig_w_px, fig_h_px = fig.get_size_inches() * fig.dpi
    panel_w_px, panel_h_px = w * fig_w_px, h * fig_h_px
    longest = max(len(name) for name, _ in results)
    col_px = 30 + 5.6 * longest  # handle, gap and text at 8 pt
    ncol = max(1, min(n, int((panel_w_px - 16) // col_px)))
    rows = math.ceil(n / ncol)
    legend_px = 15 * rows + 8
    title_px, ticks_px, left_px = 30, 22, 62
    ax = fig.add_axes([
        x + left_px / fig_w_px,
        y + (legend_px + ticks_px) / fig_h_px,
        w - (left_px + 12) / fig_w_px,
        h - (legend_px + ticks_px + title_px) / fig_h_px,
    ])
    ax.set_facecolor(PANEL)
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.grid(True, color=GRID, lw=0.7)
    ax.tick_params(colors=MUTED, labelsize=8, length=0)
    for a in annotations:
        if a["end"] is not None:
            ax.axvspan(a["start"], a["end"], color=a["color"], alpha=0.12, lw=0)
        else:
            ax.axvline(a["start"], color=a["color"], lw=1, ls="--", alpha=0.8)
    lines = []
    top = 0.0
    for i, (name, values) in enumerate(results):
        c = PALETTE[i % len(PALETTE)]
        v = np.where(np.isfinite(values), values, np.nan)
        if np.any(~np.isnan(v)):
            top = max(top, float(np.nanmax(v)))
        # Grafana's defaults for a timeseries field with no custom config: a 1 px
        # linear line, no fill, gaps where there is no value.
        (line,) = ax.plot(steps, v, color=c, lw=1.2)
        lines.append((line, name))
    ax.set_xlim(steps[0], steps[-1])
    ax.set_ylim(0, top * 1.08 if top > 0 else 1)
    span_s = (steps[-1] - steps[0]) * 86400
    ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S" if span_s < 600 else "%H:%M", tz=tz))
    ax.xaxis.set_major_locator(mdates.AutoDateLocator(tz=tz, minticks=4, maxticks=9))
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: fmt_value(v, unit)))
    ax.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(5))
    leg_ax = fig.add_axes([x + 6 / fig_w_px, y + 2 / fig_h_px, w - 12 / fig_w_px, legend_px / fig_h_px])
    leg_ax.axis("off")
    # Grafana's list legend reads row by row; matplotlib fills columns: reorder.
    order = [r * ncol + c for c in range(ncol) for r in range(rows) if r * ncol + c < n]
    lines = [lines[i] for i in order]
    leg = leg_ax.legend([l for l, _ in lines], [nm for _, nm in lines], loc="upper left", ncol=ncol,
                        frameon=False, fontsize=8, labelcolor=TEXT, handlelength=1.2,
                        columnspacing=1.2, borderaxespad=0.2, handletextpad=0.4, labelspacing=0.35)
    for handle in leg.legend_handles:
        handle.set_linewidth(3)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dashboard", default=str(HERE / "treaty-dashboard.json"))
    p.add_argument("--samples", default=str(HERE / "samples.jsonl.xz"))
    p.add_argument("--events", default=str(HERE / "events.json"), help="record_run.py's events, if any")
    p.add_argument("--out", default=str(HERE / "treaty-dashboard.png"))
    p.add_argument("--width-px", type=int, default=1920)
    p.add_argument("--until", type=float, default=None,
                   help="end the time range this many seconds after the first scrape (as if the "
                        "dashboard were looked at then); default: the last scrape")
    args = p.parse_args()

    dash = json.loads(Path(args.dashboard).read_text())
    samples = Samples(args.samples)
    step = samples.scrape_interval
    last = samples.times[-1] if args.until is None else min(samples.times[-1], samples.times[0] + args.until)
    # Every evaluation at t reads only samples at or before t, so ending the range early
    # shows exactly what the dashboard showed at that moment.
    steps_s = np.arange(samples.times[0], last + step / 2, step)
    tz = timezone.utc
    steps = np.array([mdates.date2num(datetime.fromtimestamp(t, tz)) for t in steps_s])

    annotations, names = [], {}
    events = []
    if args.events and Path(args.events).exists():
        events = json.loads(Path(args.events).read_text()).get("events", [])
    downs = {}
    for e in events:
        if e["t"] / 1000 > steps_s[-1]:
            continue  # not yet happened at the end of the range
        when = mdates.date2num(datetime.fromtimestamp(e["t"] / 1000, tz))
        text = e["event"]
        m = re.match(r"^(\S+) (http://\S+)$", text)
        if m:
            names[m.group(2)] = m.group(1)
        m = re.match(r"^bench participant (p\d) (http://\S+)$", text)
        if m:
            names[m.group(2)] = f"bench {m.group(1)}"
        m = re.match(r"^(\S+) killed", text)
        if m:
            downs[m.group(1)] = when
        m = re.match(r"^(\S+) restarted", text)
        if m and m.group(1) in downs:
            annotations.append({"start": downs.pop(m.group(1)), "end": when, "color": "#F2495C",
                                "label": f"{m.group(1)} down"})
        if text.startswith("treaty bench"):
            annotations.append({"start": when, "end": None, "color": "#8AB8FF", "label": "bench starts"})
        if text.startswith("operator:"):
            annotations.append({"start": when, "end": None, "color": "#B877D9", "label": "operator resolves"})
    for name, since in downs.items():  # still down at the end of the range
        annotations.append({"start": since, "end": steps[-1], "color": "#F2495C", "label": f"{name} down"})

    panels = sorted(dash["panels"], key=lambda pn: (pn["gridPos"]["y"], pn["gridPos"]["x"]))
    rows = max(pn["gridPos"]["y"] + pn["gridPos"]["h"] for pn in panels)
    col_px = args.width_px / 24
    row_px, margin_px, header_px = 34, 8, 118
    height_px = header_px + rows * row_px + margin_px
    dpi = 100
    fig = plt.figure(figsize=(args.width_px / dpi, height_px / dpi), dpi=dpi, facecolor=BG)

    start = datetime.fromtimestamp(steps_s[0], tz)
    end = datetime.fromtimestamp(steps_s[-1], tz)
    fig.text(8 / args.width_px, 1 - 10 / height_px, dash.get("title", ""), ha="left", va="top",
             fontsize=16, color=TEXT, fontweight="bold")
    fig.text(1 - 8 / args.width_px, 1 - 12 / height_px,
             f"{start:%Y-%m-%d %H:%M:%S} to {end:%H:%M:%S} UTC  ({(steps_s[-1] - steps_s[0]) / 60:.1f} min, "
             f"step {step:.0f} s)",
             ha="right", va="top", fontsize=10, color=TEXT)
    note = ("Rendered by docs/grafana/render_dashboard.py, not by Grafana: the dashboard's PromQL evaluated over "
            f"{len(samples.times)} scrapes of a real run's /metrics (see docs/grafana/README.md).")
    fig.text(8 / args.width_px, 1 - 40 / height_px, note, ha="left", va="top", fontsize=9, color=MUTED)
    if annotations or names:
        key = []
        if annotations:
            key.append("Annotations from the run's event log (not in the dashboard JSON): red bands = a "
                       "participant killed until restarted; blue dashed = treaty bench starts; purple dashed = "
                       "operator resolves the bench's orphaned branches.")
        if names:
            key.append("Endpoints: " + ",  ".join(f"{v} = {k.removeprefix('http://')}" for k, v in names.items()))
        fig.text(8 / args.width_px, 1 - 60 / height_px, "\n".join(key), ha="left", va="top",
                 fontsize=9, color=MUTED, linespacing=1.6)

    for panel in panels:
        g = panel["gridPos"]
        px = g["x"] * col_px + margin_px / 2
        pw = g["w"] * col_px - margin_px
        py_top = header_px + g["y"] * row_px + margin_px / 2
        ph = g["h"] * row_px - margin_px
        rect = [px / args.width_px, 1 - (py_top + ph) / height_px, pw / args.width_px, ph / height_px]
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "")
        results = evaluate_panel(panel, samples, steps_s)
        if panel["type"] == "stat":
            draw_stat(fig, rect, panel, results, steps, unit)
        else:
            draw_timeseries(fig, rect, panel, results, steps, unit, annotations, tz)
    fig.savefig(args.out, dpi=dpi, facecolor=BG)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
