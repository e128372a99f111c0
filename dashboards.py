"""What analysis.ipynb's charts and sentences need to read well whatever the data: a date axis
for any span, the emergency calls' time labels for any number of calls, and the before/after-1pm
sentence that must agree with the percentages it shows.

It lives beside the notebook, not in it, so that tests/test_analysis.py can draw these parts on
their own at spans and counts the sample databases never reach.
"""
from __future__ import annotations

from datetime import time

import matplotlib.dates as mdates
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.transforms import Bbox

# Calls at one exhibition whose markers are closer than this many pixels share one label.
BURST_PIXELS = 30
LABEL_OFFSET_POINTS = 7  # clear of the marker (110 pt², about 5 pt from its centre to its edge)
LABEL_MARGIN_PIXELS = 2  # labels keep this far from each other and from the frame
MARKER = {"s": 110, "marker": "X", "edgecolor": "white", "linewidth": 0.8, "zorder": 3}


def date_axis(ax: Axes, first: pd.Timestamp, last: pd.Timestamp) -> str:
    """Dates on the x axis that never run into each other at any span: AutoDateLocator picks
    hours for a day, days for a month, months or years for three years, at most seven of them,
    and ConciseDateFormatter writes each as briefly as it can. Returns the year or years, month
    or day from `first` to `last` ("2023–2025", "2024", "November 2025", "6 March 2023") for the
    caller's axis label: matplotlib's own corner note for it would run into a long label."""
    locator = mdates.AutoDateLocator(minticks=3, maxticks=7)
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator, show_offset=False))
    if first.year != last.year:
        return f"{first:%Y}–{last:%Y}"
    if first.month != last.month:
        return f"{first:%Y}"
    return f"{first:%B %Y}" if first.day != last.day else f"{first:%-d %B %Y}"


def bursts(pixels: np.ndarray, gap: float = BURST_PIXELS) -> list[list[int]]:
    """Indexes of sorted x positions, grouped where each is within `gap` of the one before."""
    groups: list[list[int]] = []
    for i, x in enumerate(pixels):
        if groups and x - pixels[groups[-1][-1]] < gap:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def burst_label(moments: pd.Series, one_day: bool, with_year: bool) -> str:
    """A burst of calls in words: its time (and day, unless every call is on one day), or its
    first and last time and how many calls when there are several."""
    start, end = moments.min(), moments.max()
    day = "%-d %b %Y" if with_year else "%-d %b"
    count = f" ({len(moments)})" if len(moments) > 1 else ""
    if start.date() != end.date():
        same_month = (start.year, start.month) == (end.year, end.month)
        return f"{start:{'%-d' if same_month else day}}–{end:{day}}{count}"
    when = "" if one_day else f"{start:{day}} "
    until = f"–{end:%H:%M}" if f"{end:%H:%M}" != f"{start:%H:%M}" else ""
    return f"{when}{start:%H:%M}{until}{count}"


def _fits(box: Bbox, frame: Bbox, placed: list[Bbox]) -> bool:
    m = LABEL_MARGIN_PIXELS
    inside = (box.x0 >= frame.x0 + m and box.x1 <= frame.x1 - m
              and box.y0 >= frame.y0 + m and box.y1 <= frame.y1 - m)
    return inside and not any(box.x0 < p.x1 + m and p.x0 < box.x1 + m
                              and box.y0 < p.y1 + m and p.y0 < box.y1 + m for p in placed)


def place_label(ax: Axes, text: str, first: tuple, last: tuple, placed: list[Bbox]):
    """Write `text` beside a burst (from its `first` to its `last` point): above it, below it, or
    ending at its last call, whichever is first to stay inside the chart and clear of every
    label in `placed` (which it joins). Returns the label, or None when no place fits."""
    renderer = ax.figure.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    for point, ha in ((first, "left"), (last, "right")):
        for dy, va in ((LABEL_OFFSET_POINTS, "bottom"), (-LABEL_OFFSET_POINTS, "top")):
            label = ax.annotate(text, point, xytext=(0, dy), textcoords="offset points",
                                ha=ha, va=va, fontsize=9, annotation_clip=False)
            box = label.get_window_extent(renderer)
            if _fits(box, frame, placed):
                placed.append(box)
                return label
            label.remove()
    return None


def label_bursts(ax: Axes, incidents: pd.DataFrame, rows: list[str], one_day: bool
                 ) -> tuple[list, int]:
    """Label every burst of calls at each exhibition (row) where it fits; returns the labels and
    how many calls went unlabelled. Positions are measured after a draw, so the layout is final:
    the labels stay inside the chart, so they never move it again."""
    ax.figure.canvas.draw()
    with_year = incidents.local_at.dt.year.nunique() > 1
    placed: list[Bbox] = []
    labels, unlabelled = [], 0
    for name in reversed(rows):  # top row first, as the eye reads
        calls = incidents[incidents.exhibition_name == name].sort_values("local_at")
        y = rows.index(name)
        x = mdates.date2num(calls.local_at)
        pixels = ax.transData.transform(np.column_stack([x, np.full(len(x), y)]))[:, 0]
        for burst in bursts(pixels):
            moments = calls.local_at.iloc[burst]
            text = burst_label(moments, one_day, with_year)
            label = place_label(ax, text, (x[burst[0]], y), (x[burst[-1]], y), placed)
            if label is None:
                unlabelled += len(burst)
            else:
                labels.append(label)
    return labels, unlabelled


def emergency_timeline(ax: Axes, incidents: pd.DataFrame, rows: list[str], opening: time,
                       closing: time, colour: str) -> None:
    """Each emergency call (`incidents`: local_at, exhibition_name) as a cross on its
    exhibition's row (`rows`, bottom to top), labelled with its time wherever a label fits.
    One day is shown over the opening hours; longer spans over the calls' own dates. Draw it
    last: it settles the figure's layout to measure its labels."""
    if not len(incidents):
        ax.text(0.5, 0.5, "No emergency calls recorded", ha="center", va="center",
                transform=ax.transAxes, fontsize=12)
        ax.set_xticks([])
        return
    ax.scatter(incidents.local_at, [rows.index(n) for n in incidents.exhibition_name],
               color=colour, **MARKER)
    first, last = incidents.local_at.min(), incidents.local_at.max()
    one_day = first.date() == last.date()
    if one_day:
        day = first.normalize()
        ax.set_xlim(day + pd.Timedelta(hours=opening.hour, minutes=opening.minute - 15),
                    day + pd.Timedelta(hours=closing.hour, minutes=closing.minute + 15))
    else:
        pad = max((last - first) * 0.04, pd.Timedelta(hours=6))
        ax.set_xlim(first - pad, last + pad)
    span = date_axis(ax, first, last)
    axis_label = (f"Time on {first:%-d %B %Y} (museum time)" if one_day else
                  f"Date in {span} (museum time)")
    ax.set_xlabel(axis_label)
    labels, unlabelled = label_bursts(ax, incidents, rows, one_day)
    if unlabelled:  # the note's second line shrinks the chart: measure and label again
        for label in labels:
            label.remove()
        ax.set_xlabel(f"{axis_label}\n{unlabelled} calls are too close to others to label")
        labels, unlabelled = label_bursts(ax, incidents, rows, one_day)
        ax.set_xlabel(f"{axis_label}\n{unlabelled} of the {len(incidents)} calls are too close "
                      "to others to label" if unlabelled else axis_label)


def percent(share: float) -> str:
    """A share as the tables show it: a whole percentage, or a dash for no ratings."""
    return "–" if pd.isna(share) else f"{share:.0%}"


def before_after_conclusion(before: int, after: int, share_before: float,
                            share_after: float) -> str:
    """Question 5's answer: which side of 1pm has more positive ratings, and whether their
    share of each side's ratings agrees. Shares are compared as shown (whole percentages):
    32% against 32% is about the same, whatever the digits behind them."""
    if before == after:
        counts = f"Positive ratings are as frequent before as after 1pm: {before:,} each "
    else:
        more, fewer = ("before", "after") if before > after else ("after", "before")
        counts = (f"Positive ratings are more frequent {more} 1pm: {max(before, after):,} "
                  f"against {min(before, after):,} {fewer} ")
    counts += "(1pm itself counts as after)."
    shown_before, shown_after = percent(share_before), percent(share_after)
    if "–" in (shown_before, shown_after):
        return f"{counts} There are no ratings {'before' if shown_before == '–' else 'after'} 1pm."
    shares = (f" As a share of each period's ratings it is {shown_before} before against "
              f"{shown_after} after")
    if shown_before == shown_after:
        return f"{counts}{shares}: about the same share."
    larger = "before" if share_before > share_after else "after"
    if before == after:
        return f"{counts}{shares}: a larger share {larger}, as fewer ratings come then."
    if (larger == "before") == (before > after):
        return f"{counts}{shares}."
    return (f"{counts}{shares}: a larger share {larger}, but more ratings overall come "
            f"{'after' if larger == 'before' else 'before'} 1pm.")
