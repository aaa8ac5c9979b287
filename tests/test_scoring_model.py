"""The TOML scoring model: the default file, durations, and errors that name the field and the line."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest

from funnel.models import Stage
from funnel.scoring_model import (
    Decay,
    FitRule,
    ModelError,
    ScoringModel,
    format_duration,
    load_model,
    parse_duration,
    parse_model,
)
from tests.funnel_helpers import (
    DEFAULT_MODEL_PATH,
    DEFAULT_TOML,
    default_model,
    model_text,
    points_decay_model,
)

# --------------------------------------------------------------------------- the default file


def test_default_model_loads_with_the_articles_numbers():
    m = load_model(DEFAULT_MODEL_PATH)
    assert m.ref == "default@1"
    assert m.thresholds.mql == 100
    assert m.thresholds.fast_track == ["demo_request"]
    assert m.thresholds.on_mql_decay == "recycle"
    ev = m.events
    assert (ev["website_visit"].points, ev["newsletter_signup"].points, ev["event_attended"].points) == (1, 20, 50)
    assert ev["webinar_attended"].points == 50
    assert ev["video_view"].points == 0
    assert ev["demo_request"].points >= m.thresholds.mql  # a demo request alone makes an MQL
    assert ev["unsubscribe"].points < 0 and ev["unsubscribe"].activity is False
    assert ev["email_bounced"].points < 0 and ev["email_bounced"].activity is False
    assert ev["newsletter_signup"].count_once and ev["demo_request"].count_once
    assert ev["website_visit"].cap == 30
    fit = {r.name: r for r in m.fit}
    assert fit["target_account"].points == 20 and fit["target_account"].equals is True
    assert fit["student"].points < 0 and fit["competitor"].points < 0 and fit["wrong_audience"].points < 0
    assert m.decay == Decay(after=timedelta(days=30), every=timedelta(days=30), percent=25, points=None)
    assert (m.frequency.window, m.frequency.bonus, m.frequency.max_multiplier) == (timedelta(days=7), 0.5, 2.0)
    assert (m.qualification.bant_min, m.qualification.meddic_min) == (3, 5)
    assert not m.shortcuts.auto_accept and not m.shortcuts.qualify_from_mql
    assert [(s.name, s.after) for s in m.nurture["iql"]] == [
        ("welcome", timedelta(days=1)), ("case-study", timedelta(days=3)), ("webinar-invite", timedelta(days=7))]
    assert [(s.name, s.after) for s in m.nurture["recycled"]] == [
        ("whats-new", timedelta(days=14)), ("check-in", timedelta(days=30))]
    slas = {s.name: s for s in m.sla}
    assert (slas["webinar_follow_up"].on_event, slas["webinar_follow_up"].due) == ("webinar_attended", timedelta(hours=12))
    assert (slas["presales_decision"].on_stage, slas["presales_decision"].met_by) == (Stage.MQL, "stage_exit")
    assert (slas["first_sales_contact"].on_stage, slas["first_sales_contact"].met_by) == (Stage.SQL, "contact")
    assert (m.cool_off.recycled, m.cool_off.lost) == (timedelta(days=30), timedelta(days=90))
    assert m.cool_off.reset_engagement_on_recycle


def test_parse_model_and_load_model_agree():
    assert parse_model(DEFAULT_TOML) == load_model(DEFAULT_MODEL_PATH) == default_model()


def test_model_survives_a_json_round_trip_as_a_workflow_payload():
    m = default_model()
    text = m.model_dump_json()
    assert '"after":"30d"' in text.replace(" ", "")  # durations travel as readable strings
    assert ScoringModel.model_validate_json(text) == m
    p = points_decay_model()
    assert ScoringModel.model_validate_json(p.model_dump_json()) == p


# --------------------------------------------------------------------------- durations


@pytest.mark.parametrize(
    "text,expected",
    [
        ("90s", timedelta(seconds=90)),
        ("15m", timedelta(minutes=15)),
        ("12h", timedelta(hours=12)),
        ("30d", timedelta(days=30)),
        ("2w", timedelta(weeks=2)),
        ("1.5h", timedelta(minutes=90)),
        (" 7d ", timedelta(days=7)),
        (3600, timedelta(hours=1)),
        (0.5, timedelta(milliseconds=500)),
        (timedelta(days=1), timedelta(days=1)),
    ],
)
def test_durations_parse(text, expected):
    assert parse_duration(text) == expected


@pytest.mark.parametrize("bad", ["12x", "", "12", "h", "1d2h", "-5m", "0s", 0, -3, True, None, [1]])
def test_bad_durations_are_refused_with_a_hint(bad):
    with pytest.raises(ValueError, match=r"is not a duration|must be positive") as err:
        parse_duration(bad)
    if "not a duration" in str(err.value):
        assert "'90s', '15m', '12h', '30d' or '2w'" in str(err.value)


@pytest.mark.parametrize("text", ["90s", "15m", "12h", "30d", "2w"])
def test_durations_format_back_to_the_same_text(text):
    assert format_duration(parse_duration(text)) == text


def test_format_duration_picks_the_largest_whole_unit():
    assert format_duration(timedelta(days=14)) == "2w"
    assert format_duration(timedelta(days=60)) == "60d"
    assert format_duration(timedelta(hours=36)) == "36h"
    assert format_duration(timedelta(seconds=61)) == "61s"


def test_durations_in_the_file_accept_every_unit():
    text = model_text(('after = "30d"\nevery = "30d"', 'after = "2w"\nevery = "12h"'),
                      ('window = "7d"', 'window = "90s"'), ('due = "12h"', 'due = "15m"'))
    m = parse_model(text)
    assert (m.decay.after, m.decay.every) == (timedelta(weeks=2), timedelta(hours=12))
    assert m.frequency.window == timedelta(seconds=90)
    assert m.sla[0].due == timedelta(minutes=15)


# --------------------------------------------------------------------------- errors: field and line


def _error(text: str) -> str:
    with pytest.raises(ModelError) as err:
        parse_model(text, "bad.toml")
    return str(err.value)


def _line(text: str, message: str) -> str:
    """The text of the line the error message points at."""
    found = re.search(r"\(line (\d+)\)", message)
    assert found, f"no line number in: {message}"
    return text.splitlines()[int(found.group(1)) - 1].strip()


BAD_FILES = [
    pytest.param(("percent = 25", "percent = 250"), "decay.percent", "percent = 250",
                 "less than or equal to 100", id="decay-percent-250"),
    pytest.param(("percent = 25", "percent = 0"), "decay.percent", "percent = 0", "greater than 0", id="decay-percent-0"),
    pytest.param(("cap = 30 ", "pointz = 2\ncap = 30 "), "events.website_visit.pointz", "pointz = 2",
                 "Extra inputs are not permitted", id="unknown-event-key"),
    pytest.param(("mql = 100", "mql = 100\nmlq = 90"), "thresholds.mlq", "mlq = 90",
                 "Extra inputs are not permitted", id="unknown-thresholds-key"),
    pytest.param(('name = "default"', 'name = "default"\ncolour = "red"'), "colour", 'colour = "red"',
                 "Extra inputs are not permitted", id="unknown-top-level-key"),
    pytest.param(('due = "12h"', 'due = "12x"'), "sla.0.due", 'due = "12x"', "'12x' is not a duration",
                 id="bad-duration-first-sla"),
    pytest.param(('due = "1d"', 'due = "12x"'), "sla.3.due", 'due = "12x"', "'12x' is not a duration",
                 id="bad-duration-fourth-sla"),
    pytest.param(('after = "14d"', 'after = "14x"'), "nurture.recycled.0.after", 'after = "14x"',
                 "'14x' is not a duration", id="bad-duration-nurture"),
    pytest.param(('window = "7d"', 'window = "7x"'), "frequency.window", 'window = "7x"', "not a duration",
                 id="bad-duration-window"),
    pytest.param(('fast_track = ["demo_request"]', 'fast_track = ["demo_requets"]'), "thresholds.fast_track",
                 'fast_track = ["demo_requets"]', "unknown event types: demo_requets", id="fast-track-unknown-type"),
    pytest.param(('field = "industry"\n', 'field = "industry"\nequals = "software"\n'), "fit.2",
                 "[[fit]]", "fit rule 'industry' needs exactly one of: equals, one_of, min/max",
                 id="fit-rule-two-conditions"),
    pytest.param(('field = "seniority"\none_of = ["c_level", "vp", "director", "decision_maker"]\n',
                  'field = "seniority"\n'), "fit.3", "[[fit]]",
                 "fit rule 'decision_maker' needs exactly one of", id="fit-rule-no-condition"),
    pytest.param(('name = "student"', 'name = "target_account"'), "fit.5.name", 'name = "target_account"',
                 "fit rule names must be unique", id="fit-rule-duplicate-name"),
    pytest.param(('[events.live_chat]\npoints = 15', '[events.live_chat]\npoints = "lots"'),
                 "events.live_chat.points", 'points = "lots"', "valid number", id="points-not-a-number"),
    pytest.param(('[events.live_chat]\npoints = 15', '[events.live_chat]\ncap = 5'),
                 "events.live_chat.points", "[events.live_chat]", "Field required", id="points-missing"),
    pytest.param(('cap = 30', 'cap = 0'), "events.website_visit.cap", "cap = 0", "greater than 0", id="cap-zero"),
    pytest.param(('[events.video_view]', '[events.VideoView]'), "events.VideoView", "[events.VideoView]",
                 "use lower_snake_case", id="event-type-not-snake-case"),
    pytest.param(('on_event = "webinar_attended"', 'on_event = "webinar"'), "sla.0.on_event",
                 'on_event = "webinar"', "'webinar' is not an event type", id="sla-unknown-event"),
    pytest.param(('on_event = "webinar_attended"\ndue = "12h"\nmet_by = "contact"',
                  'on_event = "webinar_attended"\ndue = "12h"\nmet_by = "stage_exit"'), "sla.0", "[[sla]]",
                 "can only be met_by 'contact'", id="sla-event-met-by-stage-exit"),
    pytest.param(('on_stage = "sql"', 'on_stage = "sql"\non_event = "live_chat"'), "sla.3", "[[sla]]",
                 "needs exactly one of: on_stage, on_event", id="sla-two-starts"),
    pytest.param(('on_stage = "mql"', 'on_stage = "maybe"'), "sla.1.on_stage", 'on_stage = "maybe"',
                 "Input should be", id="sla-unknown-stage"),
    pytest.param(("percent = 25", "percent = 25\npoints = 10"), "decay", "[decay]",
                 "decay needs exactly one of: percent, points", id="decay-percent-and-points"),
    pytest.param(("bant_min = 3", "bant_min = 5"), "qualification.bant_min", "bant_min = 5",
                 "less than or equal to 4", id="bant-min-5"),
    pytest.param(('on_mql_decay = "recycle"', 'on_mql_decay = "drop"'), "thresholds.on_mql_decay",
                 'on_mql_decay = "drop"', "'recycle' or 'stay'", id="on-mql-decay-unknown"),
    pytest.param(('version = "1"', 'version = "v 1"'), "version", 'version = "v 1"', "String should match",
                 id="bad-version"),
]


@pytest.mark.parametrize("change,field,line_text,why", BAD_FILES)
def test_a_bad_file_names_the_field_and_the_line(change, field, line_text, why):
    text = model_text(change)
    message = _error(text)
    assert message.startswith("bad.toml: invalid scoring model:")
    assert f"  {field} (line " in message, message
    assert _line(text, message) == line_text or _line(text, message).startswith(line_text + " "), message
    assert why in message


def test_every_problem_in_a_file_is_reported_at_once():
    text = model_text(("percent = 25", "percent = 250"), ("bant_min = 3", "bant_min = 9"))
    message = _error(text)
    assert "decay.percent (line" in message and "qualification.bant_min (line" in message


def test_invalid_toml_names_the_line():
    message = _error(model_text(('name = "default"', "name = default")))
    assert message.startswith("bad.toml: not valid TOML:")
    assert "line 4" in message


def test_events_are_required():
    message = _error('name = "x"\nversion = "1"\n')
    assert "events" in message and "Field required" in message


def test_load_model_of_a_missing_file_says_so(tmp_path):
    with pytest.raises(ModelError, match=r"cannot read scoring model .*nope\.toml"):
        load_model(tmp_path / "nope.toml")


def test_load_model_names_the_file_in_errors(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text(model_text(("percent = 25", "percent = 250")), encoding="utf-8")
    with pytest.raises(ModelError, match=r"mine\.toml: invalid scoring model:\n  decay\.percent \(line \d+\)"):
        load_model(path)


# --------------------------------------------------------------------------- decay variants


def test_points_decay_is_expressible_in_toml():
    m = points_decay_model(10)
    assert (m.decay.points, m.decay.percent) == (10, None)


def test_decay_defaults_to_percent_when_neither_is_given():
    m = parse_model(model_text(("percent = 25\n", "")))
    assert (m.decay.percent, m.decay.points) == (25, None)


# --------------------------------------------------------------------------- fit rule matching


def _rule(**kw) -> FitRule:
    return FitRule(name="r", field="f", points=1, **kw)


@pytest.mark.parametrize(
    "rule,value,matches",
    [
        ({"equals": True}, True, True),
        ({"equals": True}, False, False),
        ({"equals": True}, 1, False),  # a bool never equals a number
        ({"equals": 1}, True, False),
        ({"equals": 1}, 1.0, True),
        ({"equals": True}, "true", False),
        ({"equals": "Software"}, "sOFTWARE", True),
        ({"one_of": ["DE", "AT"]}, "de", True),
        ({"one_of": ["DE", "AT"]}, "FR", False),
        ({"one_of": [1, 2]}, True, False),
        ({"min": 50, "max": 5000}, 50, True),
        ({"min": 50, "max": 5000}, 5000, True),
        ({"min": 50, "max": 5000}, 49, False),
        ({"min": 50, "max": 5000}, 5001, False),
        ({"min": 50}, 10**6, True),
        ({"max": 10}, -1, True),
        ({"min": 0}, True, False),  # bools are not numbers for a range either
        ({"min": 0}, "100", False),
    ],
)
def test_fit_rule_conditions(rule, value, matches):
    assert _rule(**rule).matches({"f": value}) is matches


def test_fit_rule_on_a_missing_fact_does_not_match():
    assert _rule(equals=True).matches({"other": True}) is False


def test_the_line_is_found_for_dotted_keys_and_inline_tables():
    dotted = model_text(('[decay]\nafter = "30d"\nevery = "30d"\npercent = 25\n', ""),
                        ('version = "1"', 'version = "1"\ndecay.percent = 250'))
    message = _error(dotted)
    assert _line(dotted, message) == "decay.percent = 250"
    inline = model_text(('[frequency]\nwindow = "7d"\nbonus = 0.5\nmax_multiplier = 2.0\n', ""),
                        ('version = "1"', 'version = "1"\nfrequency = { window = "7d", bonus = -1 }'))
    message = _error(inline)
    assert "frequency.bonus (line" in message
    assert _line(inline, message).startswith("frequency = {")
