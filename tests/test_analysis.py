"""analysis.ipynb and the analysis views of schema.sql.

The notebook runs top to bottom (nbclient, a real kernel) on a database that the pipeline loaded
from generated sample data; its answers must equal the same seven questions computed here straight
from the base tables in Python (never through the views, so the views are checked too), and its
dashboards must be titled and name exhibitions in words, never by id. Drawn on the real captures,
on `make demo`'s data, on one day and on one month, no two texts of any dashboard overlap, and
every conclusion agrees with the figures it shows.
"""
from __future__ import annotations

import inspect
import json
import re
from collections import Counter
from datetime import datetime, time, timedelta
from pathlib import Path
from statistics import fmean
from zoneinfo import ZoneInfo

import nbformat
import numpy as np
import pandas as pd
import pytest
from confluent_kafka import Producer
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.text import Text
from nbclient import NotebookClient

import dashboards
import load
import pipeline
import sample_data
from helpers import rows, run_consumer_in_process

PROJECT = Path(__file__).resolve().parent.parent
NOTEBOOK = PROJECT / "analysis.ipynb"
SCHEMA = (PROJECT / "schema.sql").read_text()
LONDON = ZoneInfo("Europe/London")
DASHBOARDS = {"exhibition_performance", "security", "rating_over_time"}
EXHIBITION_ID = re.compile(r"EXH_\d+")
BARE_INTEGER = re.compile(r"[-\u2212]?\d+")

# Run after the notebook in its kernel: every text of every dashboard figure, as one JSON line.
INSPECT_FIGURES = '''
import json as _json
_found = {}
for _name, _fig in figures.items():
    _fig.canvas.draw()
    _axes = []
    for _ax in _fig.axes:
        if _ax.get_label() == "<colorbar>":
            continue
        _legend = _ax.get_legend()
        _axes.append({"title": _ax.get_title(), "xlabel": _ax.get_xlabel(),
                      "ylabel": _ax.get_ylabel(),
                      "xticks": [t.get_text() for t in _ax.get_xticklabels()],
                      "yticks": [t.get_text() for t in _ax.get_yticklabels()],
                      "legend": [t.get_text() for t in _legend.get_texts()] if _legend else [],
                      "texts": [t.get_text() for t in _ax.texts]})
    _found[_name] = {"suptitle": _fig.get_suptitle(), "axes": _axes}
print("FIGURES " + _json.dumps(_found))
'''


def drawn_texts(fig) -> list[tuple[str, object]]:
    """Every text a draw of `fig` puts on the page (titles, axis labels, tick labels, legends,
    annotations, colorbar), with its extent in pixels. Found by drawing: a tick label outside
    the view or an annotation off its chart exists as an artist but is not drawn."""
    if not hasattr(fig.canvas, "get_renderer"):  # a closed pyplot figure keeps a bare canvas
        FigureCanvasAgg(fig)
    drawn = []
    draw = Text.draw

    def record(self, renderer):
        if self.get_visible() and self.get_text().strip():
            drawn.append(self)
        return draw(self, renderer)

    Text.draw = record
    try:
        fig.canvas.draw()
    finally:
        Text.draw = draw
    renderer = fig.canvas.get_renderer()
    return [(t.get_text(), t.get_window_extent(renderer)) for t in drawn]


def overlapping_texts(fig) -> list[list[str]]:
    """Pairs of drawn texts whose extents overlap by more than a pixel each way."""
    texts = drawn_texts(fig)
    return [[a, b] for i, (a, box) in enumerate(texts) for b, other in texts[i + 1:]
            if min(box.x1, other.x1) - max(box.x0, other.x0) > 1
            and min(box.y1, other.y1) - max(box.y0, other.y0) > 1]


# Run after the notebook in its kernel: for every dashboard, the texts drawn and those overlapping.
CHECK_OVERLAPS = "\n\n".join([
    "import json as _json\nfrom matplotlib.backends.backend_agg import FigureCanvasAgg\n"
    "from matplotlib.text import Text",
    inspect.getsource(drawn_texts), inspect.getsource(overlapping_texts),
    'print("OVERLAPS " + _json.dumps({_name: {"texts": len(drawn_texts(_fig)), "overlapping": '
    'overlapping_texts(_fig)} for _name, _fig in figures.items()}))'])


def execute_notebook() -> nbformat.NotebookNode:
    """The notebook executed in a fresh kernel that inherits this process's environment."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(INSPECT_FIGURES))
    nb.cells.append(nbformat.v4.new_code_cell(CHECK_OVERLAPS))
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(PROJECT)}}).execute()
    return nb


def outputs(nb: nbformat.NotebookNode) -> list[dict]:
    return [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]


def printed(nb: nbformat.NotebookNode, prefix: str):
    """The JSON a cell printed on a line starting with `prefix`."""
    for out in outputs(nb):
        if out.output_type == "stream":
            for line in out.text.splitlines():
                if line.startswith(prefix):
                    return json.loads(line[len(prefix):])
    raise AssertionError(f"the notebook printed no {prefix.strip()} line")


def assert_readable(nb: nbformat.NotebookNode) -> None:
    """No two texts of a dashboard overlap, and question 5's words agree with its percentages."""
    for name, found in printed(nb, "OVERLAPS ").items():
        assert found["texts"] > 10, f"{name}: only {found['texts']} texts drawn"
        assert not found["overlapping"], f"{name}: texts overlap: {found['overlapping']}"
    conclusions = [out.data["text/markdown"] for out in outputs(nb)
                   if out.get("data", {}).get("text/markdown", "").startswith("**Conclusion:**")]
    check_before_after_sentence(conclusions[4])


def check_before_after_sentence(text: str) -> None:
    """Question 5: the comparison words follow the two percentages as the sentence shows them."""
    shares = re.search(r"it is (\d+)% before against (\d+)% after(.*)", text)
    if shares is None:
        assert "no ratings" in text, text
        return
    before, after, rest = int(shares[1]), int(shares[2]), shares[3]
    if before == after:
        assert "about the same" in rest and not re.search("larger|smaller", rest), text
    else:
        smaller = "after" if before > after else "before"
        assert "about the same" not in rest and f"larger share {smaller}" not in rest, text


def leaders(counts: Counter) -> tuple[list, int]:
    best = max(counts.values(), default=0)
    return sorted(k for k, v in counts.items() if v == best and best > 0), best


def expected_answers(conn) -> dict:
    """The seven questions, from the base tables, with hours converted to museum time in Python."""
    exhibitions = [r[0] for r in rows(conn, "SELECT exhibition_name FROM exhibition")]
    ratings = rows(conn, """
        SELECT e.exhibition_name, d.department_name, r.rating_value, r.rating_description,
               ri.event_at
        FROM rating_interaction ri
        JOIN exhibition e ON e.exhibition_id = ri.exhibition_id
        JOIN department d ON d.department_id = e.department_id
        JOIN rating r ON r.rating_id = ri.rating_id""")
    calls = rows(conn, """
        SELECT e.exhibition_name, q.request_description, ri.event_at
        FROM request_interaction ri
        JOIN exhibition e ON e.exhibition_id = ri.exhibition_id
        JOIN request q ON q.request_id = ri.request_id""")
    assert ratings and calls, "the pipeline loaded nothing to analyse"

    def hour(at: datetime) -> int:
        return at.astimezone(LONDON).hour

    visits = Counter({name: 0 for name in exhibitions})
    visits.update(name for name, *_ in ratings)
    visits.update(name for name, *_ in calls)
    most_visited, interactions = leaders(visits)
    busiest_hours, hour_ratings = leaders(Counter(hour(at) for *_, at in ratings))
    most_emergencies, emergencies = leaders(
        Counter(name for name, kind, _ in calls if kind == "Emergency"))
    values: dict[str, list[int]] = {name: [] for name in exhibitions}
    for name, _, value, _, _ in ratings:
        values[name].append(value)
    positive = [at for _, _, value, _, at in ratings if value >= 3]  # Good or better
    before = sum(hour(at) < 13 for at in positive)
    after = len(positive) - before
    zoology = fmean(v for _, dept, v, _, _ in ratings if dept == "Zoology")
    others = fmean(v for _, dept, v, _, _ in ratings if dept != "Zoology")
    assistance = Counter((name, hour(at)) for name, kind, at in calls if kind == "Assistance")
    return {
        "most_visited": {"exhibitions": most_visited, "interactions": interactions},
        "busiest_rating_hour": {"hours": busiest_hours, "ratings": hour_ratings},
        "most_emergencies": {"exhibitions": most_emergencies, "emergencies": emergencies},
        "average_rating": {name: round(fmean(v), 2) if v else None for name, v in values.items()},
        "positive_before_after_1pm": {
            "before": before, "after": after,
            "answer": "before" if before > after else "after" if after > before else "equal"},
        "zoology_vs_others": {"zoology": round(zoology, 2), "others": round(others, 2),
                              "zoology_better": zoology > others},
        "assistance_by_exhibition_hour": sorted([name, h, n]
                                                for (name, h), n in assistance.items()),
    }


def check_dashboard(name: str, figure: dict, must_name: list[str],
                    places: dict[str, tuple[str, str]] | None = None) -> None:
    """Titled, labelled in words: no exhibition id anywhere, no axis of bare integers that is
    not a labelled quantity, and the exhibitions it shows named (a label's first line), with
    their department and floor under the name wherever `places` gives them."""
    assert figure["suptitle"].strip() or len(figure["axes"]) == 1, f"{name}: no overall title"
    texts = [figure["suptitle"]]
    for ax in figure["axes"]:
        assert ax["title"].strip(), f"{name}: a chart without a title"
        for axis in ("x", "y"):
            ticks = [t for t in ax[f"{axis}ticks"] if t.strip()]
            if ticks and all(BARE_INTEGER.fullmatch(t) for t in ticks):
                label = ax[f"{axis}label"]
                assert label.strip() and "exhibition" not in label.lower(), \
                    f"{name}, {ax['title']!r}: {axis} ticks {ticks} are bare numbers with label {label!r}"
        texts += [ax["title"], ax["xlabel"], ax["ylabel"], *ax["xticks"], *ax["yticks"],
                  *ax["legend"], *ax["texts"]]
    ids = [t for t in texts if EXHIBITION_ID.search(t)]
    assert not ids, f"{name}: exhibition ids shown: {ids}"
    labels = {t for ax in figure["axes"] for t in ax["xticks"] + ax["yticks"] + ax["legend"]}
    missing = [n for n in must_name if n not in {t.split("\n")[0] for t in labels}]
    assert not missing, f"{name}: exhibitions not named on the charts: {missing}"
    for exhibition, (department, floor) in (places or {}).items():
        shown = [t for t in labels if t.split("\n")[0] == exhibition]
        assert all(department in t and floor in t for t in shown), (name, shown)


def test_notebook_answers_from_the_loaded_data_with_readable_dashboards(
        s3, bucket, service_env, conn, monkeypatch, tmp_path):
    sample_data.seed_bucket(s3, bucket, objects=4, rows=3000, seed=3)
    assert pipeline.main(["-b", bucket, "--no-progress"]) == 0
    monkeypatch.setenv("LMNH_FIGURE_DIR", str(tmp_path))

    nb = execute_notebook()  # raises CellExecutionError, with the cell, if any cell fails

    expected = expected_answers(conn)
    answers = printed(nb, "ANSWERS ")
    for question, value in expected.items():
        assert answers.get(question) == value, question
    assert answers.keys() == expected.keys()

    conclusions = [out.data["text/markdown"] for out in outputs(nb)
                   if "text/markdown" in out.get("data", {})
                   and out.data["text/markdown"].startswith("**Conclusion:**")]
    assert len(conclusions) == 7, "each question ends with a conclusion line"
    assert all(n in conclusions[0] for n in expected["most_visited"]["exhibitions"])
    assert all(n in conclusions[2] for n in expected["most_emergencies"]["exhibitions"])

    figures = printed(nb, "FIGURES ")
    assert figures.keys() == DASHBOARDS
    assert_readable(nb)  # one day
    visits = dict(rows(conn, """
        SELECT e.exhibition_name, count(*) FROM (
            SELECT exhibition_id FROM rating_interaction
            UNION ALL SELECT exhibition_id FROM request_interaction) x
        JOIN exhibition e USING (exhibition_id) GROUP BY 1"""))
    shown = sorted(visits)
    top3 = sorted(visits, key=lambda name: (-visits[name], name))[:3]
    check_dashboard("exhibition_performance", figures["exhibition_performance"], shown)
    check_dashboard("security", figures["security"], shown)
    check_dashboard("rating_over_time", figures["rating_over_time"], top3)
    pngs = [out for out in outputs(nb) if "image/png" in out.get("data", {})]
    assert len(pngs) == len(DASHBOARDS), "each dashboard is drawn once, as a static image"
    assert sorted(p.stem for p in tmp_path.glob("*.png")) == sorted(DASHBOARDS)


def test_analysis_views_use_museum_time_whatever_the_session_timezone(conn):
    """A summer event (BST, UTC+1) lands in its London hour even in a UTC session."""
    with load.transaction(conn) as cur:
        source = load.source_id(cur, "s3", "s3://bucket/summer.csv")
        cur.execute("""
            INSERT INTO rating_interaction (exhibition_id, rating_id, event_at, source_id, position)
            SELECT e.exhibition_id, r.rating_id, %s, %s, 1 FROM exhibition e, rating r
            WHERE e.public_id = 'EXH_03' AND r.rating_value = 4""",
                    (datetime(2024, 7, 1, 12, 30, tzinfo=LONDON), source))
        cur.execute("""
            INSERT INTO request_interaction (exhibition_id, request_id, event_at, source_id, position)
            SELECT e.exhibition_id, q.request_id, %s, %s, 2 FROM exhibition e, request q
            WHERE e.public_id = 'EXH_02' AND q.request_value = 1""",
                    (datetime(2024, 7, 1, 9, 10, tzinfo=LONDON), source))
    with load.transaction(conn) as cur:
        cur.execute("SET TIME ZONE 'UTC'")
    assert rows(conn, "SELECT local_hour, hour_label, interactions, ratings, positive_ratings, "
                      "emergency_calls FROM hour_summary ORDER BY 1") == [
        (9, "09:00", 1, 0, 0, 1), (12, "12:00", 1, 1, 1, 0)]
    assert rows(conn, "SELECT exhibition_name, local_hour FROM exhibition_hour_summary "
                      "ORDER BY 2") == [("The Crenshaw Collection", 9), ("Cetacean Sensations", 12)]
    assert rows(conn, "SELECT local_at::text, local_date::text, positive FROM rating_detail") == [
        ("2024-07-01 12:30:00", "2024-07-01", True)]
    assert rows(conn, "SELECT local_hour_start::text, average_rating::float "
                      "FROM exhibition_rating_timeline") == [("2024-07-01 12:00:00", 4.0)]
    summary = dict(((name, (ratings, calls, emergencies)) for name, ratings, calls, emergencies
                    in rows(conn, "SELECT exhibition_name, ratings, calls, emergency_calls "
                                  "FROM exhibition_summary")))
    assert summary["Cetacean Sensations"] == (1, 0, 0)
    assert summary["The Crenshaw Collection"] == (0, 1, 1)
    assert summary["Thunder Lizards"] == (0, 0, 0)


def test_analysis_views_survive_applying_the_schema_again(conn):
    load.apply_schema(conn, SCHEMA)
    load.apply_schema(conn, SCHEMA)
    views = {r[0] for r in rows(conn, "SELECT table_name FROM information_schema.views "
                                      "WHERE table_schema = 'public'")}
    assert {"rating_detail", "request_detail", "interaction_detail", "exhibition_summary",
            "exhibition_rating_distribution", "exhibition_hour_summary", "hour_summary",
            "department_summary", "exhibition_rating_timeline"} <= views
    assert len(rows(conn, "SELECT * FROM exhibition_rating_distribution")) == 6 * 5


def test_notebook_is_committed_without_outputs():
    """The report is generated (make report); the notebook in git carries no stale results."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, cell.source[:60]


SIX_BUTTONS = SCHEMA.replace("(4, 'Amazing')", "(4, 'Amazing'), (5, 'Outstanding')")
ROCK_POOLS = {"EXHIBITION_NAME": "Rock Pools", "EXHIBITION_ID": "EXH_06", "FLOOR": "Vault",
              "DEPARTMENT": "Marine Biology", "START_DATE": "01/10/24",
              "DESCRIPTION": "What the tide leaves behind."}


def presses_for_new_master_data(rows_: int = 400) -> bytes:
    """Kiosk lines that use site 6 and rating 5 (rejected until the museum adds them)."""
    lines = ["at,site,val,type"]
    for i in range(rows_):
        site, val = (6, i % 6) if i % 3 else (i % 6, 5)
        lines.append(f"2023-03-06 {9 + i % 8:02d}:{i % 60:02d}:{i * 7 % 60:02d},{site},{val},")
    lines += [f"2023-03-06 1{h}:30:00,6,-1,{h % 2}.0" for h in range(4)]
    return ("\n".join(lines) + "\n").encode()


def test_notebook_shows_six_buttons_and_seven_exhibitions_without_code_changes(
        s3, bucket, service_env, conn, monkeypatch, tmp_path):
    """The museum adds rating 5 (schema.sql applied again) and exhibition 6 (its file); after
    replay.py the notebook's answers and every chart show them, in words, department and floor."""
    import replay
    sample_data.seed_bucket(s3, bucket, objects=2, rows=2000, seed=5)
    s3.put_object(Bucket=bucket, Key="lmnh_hist_data_9.csv", Body=presses_for_new_master_data())
    assert pipeline.main(["-b", bucket, "--no-progress"]) == 0
    load.apply_schema(conn, SIX_BUTTONS)
    s3.put_object(Bucket=bucket, Key="lmnh_exhibition_rockpools.json",
                  Body=sample_data.exhibition_json(ROCK_POOLS))
    assert pipeline.main(["-b", bucket, "--no-progress"]) == 0
    assert replay.main([]) == 0
    assert rows(conn, "SELECT count(*) FROM rating_detail WHERE rating_value = 5") != [(0,)]
    assert rows(conn, "SELECT count(*) FROM rating_detail WHERE public_id = 'EXH_06'") != [(0,)]
    assert len(rows(conn, "SELECT * FROM exhibition_rating_distribution")) == 7 * 6
    monkeypatch.setenv("LMNH_FIGURE_DIR", str(tmp_path))

    nb = execute_notebook()

    expected = expected_answers(conn)
    answers = printed(nb, "ANSWERS ")
    assert answers == expected
    assert "Rock Pools" in answers["average_rating"]
    markdown = " ".join(out.data["text/markdown"] for out in outputs(nb)
                        if "text/markdown" in out.get("data", {}))
    assert "5 Outstanding" in markdown and "Good, Amazing and Outstanding" in markdown
    figures = printed(nb, "FIGURES ")
    assert_readable(nb)
    places = {name: (department, floor if floor == "Vault" else f"floor {floor}")
              for name, department, floor in rows(conn, "SELECT exhibition_name, "
                                                        "department_name, floor_name "
                                                        "FROM exhibition_info")}
    assert len(places) == 7
    for dashboard in ("exhibition_performance", "security"):
        check_dashboard(dashboard, figures[dashboard], sorted(places), places)
    performance = figures["exhibition_performance"]["axes"]
    assert performance[1]["legend"] == ["Terrible", "Bad", "Neutral", "Good", "Amazing",
                                        "Outstanding"]
    assert performance[0]["xticks"][-1] == "5\nOutstanding"
    assert "Rock Pools\nMarine Biology · Vault" in performance[2]["legend"]


# ---------------------------------------------------------------------------------------------
# Readable at any span: the real captures, make demo's data, one month; any number of calls
# ---------------------------------------------------------------------------------------------

REAL_DATA = PROJECT.parent / "shared" / "real-data"  # beside the clone, as CI has it
DEMO_STREAM_START = datetime(2025, 6, 2, 9, 0, tzinfo=LONDON)  # make demo's stream, on a fixed day
MONTH_START = datetime(2025, 11, 3, 9, 0, tzinfo=LONDON)


def real_captures() -> tuple[dict[str, bytes], list[bytes]]:
    """The museum's own files (kiosk CSVs, exhibition JSON) and messages (the stream, then those
    other consumers flagged: some are valid), read where they lie."""
    if not (REAL_DATA / "kafka-stream-2024-10.jsonl").is_file():
        pytest.fail(f"the real captures are not at {REAL_DATA} (shared/ beside the clone)")
    files = {p.name: p.read_bytes() for p in [*sorted((REAL_DATA / "kiosk-csv").glob("*.csv")),
                                              *sorted((REAL_DATA / "exhibitions").glob("*.json"))]}
    stream = b"\n".join((REAL_DATA / name).read_bytes() for name in
                       ("kafka-stream-2024-10.jsonl", "kafka-flagged-2024-2025.jsonl"))
    return files, [line for line in stream.split(b"\n") if line]


def load_kind(kind: str, s3, bucket: str) -> list[bytes]:
    """Fill the bucket for `kind` of database; returns the stream to consume after the batch."""
    if kind == "real":
        files, stream = real_captures()
        for key, body in files.items():
            s3.put_object(Bucket=bucket, Key=key, Body=body)
        return stream
    if kind == "demo":  # make demo: sample_data.py --objects 4 --rows 5000, simulator --count 3000
        sample_data.seed_bucket(s3, bucket, objects=4, rows=5000)
        return sample_data.generate_messages(3000, start=DEMO_STREAM_START)
    sample_data.seed_bucket(s3, bucket, objects=0)  # the exhibitions; a month of stream only
    return sample_data.generate_messages(4000, seed=1, start=MONTH_START, interval_seconds=220)


def produce(kafka, topic: str, payloads: list[bytes]) -> None:
    producer = Producer({**kafka.client_config(), "linger.ms": 5})
    for payload in payloads:
        producer.produce(topic, payload)
        producer.poll(0)
    assert producer.flush(30) == 0, "the stream was not fully delivered"


@pytest.mark.parametrize("kind", ["real", "demo", "month"])
def test_dashboards_read_without_overlapping_texts(kind, s3, bucket, topic, kafka_settings,
                                                    service_env, conn):
    """The Head of Security's complaint (issue 20): a date axis whose labels ran into each other
    and emergency times written over one another. Every text of every dashboard is drawn clear
    of every other, on the real captures (one day of CSVs, then stream 19 months later),
    on make demo's data (three years apart) and on one month of stream."""
    stream = load_kind(kind, s3, bucket)
    assert pipeline.main(["-b", bucket, "--no-progress"]) == 0
    produce(kafka_settings, topic, stream)
    assert run_consumer_in_process("--topic", topic, "--group", f"g-{topic}",
                                   "--stop-at-end") == 0

    nb = execute_notebook()

    assert_readable(nb)
    assert printed(nb, "ANSWERS ") == expected_answers(conn)


def emergency_panel(days: int, calls: int, seed: int = 0) -> Figure:
    """The security dashboard's emergency chart alone, at its size in the dashboard, with
    `calls` emergencies at random exhibitions and times over `days` days."""
    rng = np.random.default_rng(seed)
    names = [f"Exhibition {i}\nDepartment · floor {i}" for i in range(6)]
    first = datetime(2023, 3, 6)
    moments = [first + timedelta(days=int(rng.integers(days)), minutes=int(m))
               for m in rng.integers(9 * 60, 18 * 60, calls)]
    incidents = pd.DataFrame({"local_at": pd.to_datetime(moments),
                              "exhibition_name": rng.choice(names, calls)}).sort_values("local_at")
    fig = Figure(figsize=(7.5, 5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_title("Emergency calls: when and where")
    ax.set_yticks(range(len(names)), names)
    ax.set_ylim(-0.5, len(names) - 0.5)
    dashboards.emergency_timeline(ax, incidents, names, time(8, 45), time(18, 15), "red")
    return fig


@pytest.mark.parametrize("days", [1, 2, 30, 3 * 365])
@pytest.mark.parametrize("calls", [1, 7, 60, 600])
def test_emergency_times_never_overlap_whatever_the_span_and_count(days, calls):
    fig = emergency_panel(days, calls)
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.texts]
    note = re.search(r"(\d+) of the (\d+) calls are too close to others to label", ax.get_xlabel())
    assert not overlapping_texts(fig)
    assert labels, "no call is labelled"
    labelled = sum(int(m[1]) if (m := re.search(r"\((\d+)\)$", t)) else 1 for t in labels)
    assert labelled + (int(note[1]) if note else 0) == calls, "every call labelled or counted"
    assert note is None or int(note[2]) == calls
    ticks = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
    assert 3 <= len(ticks) <= 8, ticks


@pytest.mark.parametrize(("before", "after", "share_before", "share_after", "words"), [
    (3632, 3058, 0.3161, 0.3229, "32% before against 32% after: about the same share."),
    (629, 344, 0.3347, 0.3031, "33% before against 30% after."),
    (2320, 2990, 0.3255, 0.3249, "33% before against 32% after: a larger share before, but "
                                 "more ratings overall come after 1pm."),
    (500, 400, 0.20, 0.40, "20% before against 40% after: a larger share after, but more "
                           "ratings overall come before 1pm."),
    (300, 300, 0.25, 0.30, "25% before against 30% after: a larger share after, as fewer "
                           "ratings come then."),
    (300, 0, 0.5, float("nan"), "There are no ratings after 1pm."),
])
def test_before_after_sentence_agrees_with_the_percentages_it_shows(
        before, after, share_before, share_after, words):
    text = dashboards.before_after_conclusion(before, after, share_before, share_after)
    assert text.endswith(words), text
    check_before_after_sentence(text)
