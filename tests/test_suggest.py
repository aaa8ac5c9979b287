"""Learned weights (leadflow suggest) on a generated population whose hidden propensity is
known (funnel/demo.py): the learned ranking of event types must be the true one, and the
suggested model, backtested, must catch more won leads than today's at the same volume."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest
import sklearn.linear_model  # noqa: F401 - imported before time is frozen: importing it under freezegun crawls
import sklearn.metrics  # noqa: F401
import sklearn.model_selection  # noqa: F401
from freezegun import freeze_time

import starter
from funnel import backtest, demo, suggest  # noqa: F401 - their models are defined before time is frozen
from funnel.scoring_model import parse_model
from tests.test_cli import run

NOW = datetime(2026, 11, 1, 12, 0, tzinfo=timezone.utc)


def make_store(tmp_path_factory, leads: int, seed: int) -> str:
    url = f"sqlite:///{tmp_path_factory.mktemp('learn') / 'demo.db'}"
    with pytest.MonkeyPatch.context() as mp, freeze_time(NOW):
        mp.setenv("LEADFLOW_DATABASE_URL", url)
        mp.delenv("LEADFLOW_MODEL", raising=False)
        assert starter.main(["demo-data", "--leads", str(leads), "--seed", str(seed)]) == 0
    return url


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    url = make_store(tmp_path_factory, 4000, 7)
    out = tmp_path_factory.mktemp("model") / "suggested.toml"
    with pytest.MonkeyPatch.context() as mp, freeze_time(NOW):
        mp.setenv("LEADFLOW_DATABASE_URL", url)
        code = starter.main(["suggest", "--out", str(out), "--json"])
    assert code == 0
    return url, out


def _spearman(a: list[float], b: list[float]) -> float:
    def ranks(xs: list[float]) -> list[float]:
        order = sorted(range(len(xs)), key=lambda i: xs[i])
        r = [0.0] * len(xs)
        for rank, i in enumerate(order):
            r[i] = rank
        return r

    ra, rb = ranks(a), ranks(b)
    n = len(a)
    return 1 - 6 * sum((x - y) ** 2 for x, y in zip(ra, rb)) / (n * (n * n - 1))


def test_suggest_recovers_the_ranking_of_event_types(learned, capsys, monkeypatch):
    url, out = learned
    monkeypatch.setenv("LEADFLOW_DATABASE_URL", url)
    with freeze_time(NOW):
        code, stdout, err = run(capsys, "suggest", "--out", str(out), "--json")
    assert code == 0, err
    found = json.loads(stdout)
    learned_effect = {w["rule"]: w["coefficient"] for w in found["weights"]}
    # A registration always comes with its attendance here: only their sum is identified.
    learned_effect["webinar_attended"] += learned_effect.pop("webinar_registration")
    types = sorted(t for t in demo.EVENT_EFFECTS if t in learned_effect)
    assert len(types) >= 7
    rho = _spearman([demo.EVENT_EFFECTS[t] for t in types], [learned_effect[t] for t in types])
    assert rho >= 0.9, (rho, {t: (demo.EVENT_EFFECTS[t], learned_effect[t]) for t in types})
    assert max(learned_effect, key=learned_effect.get) == "demo_request"
    assert min(learned_effect, key=learned_effect.get) == "unsubscribe"
    assert found["auc_holdout"] > 0.7 and len(found["calibration"]) == 5
    assert all(abs(c["predicted"] - c["observed"]) < 0.15 for c in found["calibration"])
    text = out.read_text()
    model = parse_model(text, "suggested")
    assert model.version == "1-suggested" and model.thresholds.mql == 100
    assert text.count("# learned: odds of winning") == len(found["weights"])
    assert model.events["demo_request"].points == next(w["points"] for w in found["weights"]
                                                         if w["rule"] == "demo_request")


def test_the_suggested_model_catches_more_won_leads_at_the_same_volume(learned, capsys, monkeypatch):
    url, out = learned
    monkeypatch.setenv("LEADFLOW_DATABASE_URL", url)
    with freeze_time(NOW):
        code, stdout, err = run(capsys, "backtest", "--model", str(out), "--json", "--workers", "2")
    assert code == 0, err
    points = json.loads(stdout)["same_volume"]
    assert len(points) == 3
    assert all(p["candidate_won"] >= p["current_won"] for p in points), points
    assert sum(p["candidate_won"] for p in points) > sum(p["current_won"] for p in points), points


def test_too_few_outcomes_says_how_many_are_needed(tmp_path_factory, tmp_path, capsys, monkeypatch):
    url = make_store(tmp_path_factory, 300, 3)
    monkeypatch.setenv("LEADFLOW_DATABASE_URL", url)
    with freeze_time(NOW):
        code, _, err = run(capsys, "suggest", "--out", str(tmp_path / "x.toml"))
    assert code == 2 and "too few closed leads to learn from" in err and "are needed" in err, err
    assert not (tmp_path / "x.toml").exists()
