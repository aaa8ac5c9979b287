"""Learned weights, explained: from closed outcomes (won against lost or disqualified), how
much each event type shown and each fit rule matched raises the odds of winning (logistic
regression, scikit-learn), checked on a holdout (AUC, calibration), turned into a candidate
scoring model on the current one's scale, with a comment per rule saying why its points.

The learned effect of an event type is that of showing it at all; the model counts points
per event, so a type's points are its effect divided by how often a lead that shows it does
(capped as the model caps it): a typical lead then gets the learned effect. The scale maps
the log-odds at which a lead is as likely to win as today's average MQL to the current
threshold. Pure apart from scikit-learn (an optional extra, imported when used).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass

from pydantic import BaseModel

from funnel.backtest import LeadLog
from funnel.models import Stage
from funnel.scoring_model import ScoringModel, parse_model

PER_RULE = 10  # outcomes of the rarer kind needed per rule learned (the usual rule of thumb)
MIN_EACH = 30


class TooFewOutcomes(ValueError):
    """Not enough closed leads to learn from; the message says how many are needed."""


class RuleWeight(BaseModel):
    rule: str  # an event type, or "fit:<name>"
    leads: int  # closed leads that show it
    won_share: float  # of those, won
    coefficient: float  # log-odds of winning it adds
    odds_ratio: float
    typical_count: float  # events: how many a lead that shows it has (capped), 1 for fit rules
    points: float  # in the candidate model
    current_points: float


class Calibration(BaseModel):
    predicted: float  # mean predicted probability in the bin
    observed: float  # share won in the bin
    leads: int


class Suggestion(BaseModel):
    closed: int
    won: int
    train: int
    holdout: int
    auc_holdout: float
    brier_holdout: float
    calibration: list[Calibration]
    threshold: float  # the current model's, kept
    mql_win_rate: float  # today's MQLs: share won, the probability mapped to the threshold
    points_per_log_odds: float
    weights: list[RuleWeight]
    model_text: str  # the candidate model (TOML)


@dataclass
class _Lead:
    events: Counter
    facts: dict
    won: bool


def _closed(logs: list[LeadLog]) -> list[_Lead]:
    found = []
    for log in logs:
        if log.outcome is None:
            continue
        events: Counter = Counter()
        facts: dict = {}
        for item in sorted(log.inputs, key=lambda i: (i.at, i.order)):
            if item.event is not None:
                events[item.event.type] += 1
            elif item.update is not None:
                facts.update(item.update.facts)
        found.append(_Lead(events, facts, log.outcome == Stage.WON))
    return found


def suggest(logs: list[LeadLog], model: ScoringModel, model_text: str, mql_win_rate: float,
            version: str, seed: int = 7) -> Suggestion:
    """Learn from the closed leads among `logs` (give matured leads only: among young ones,
    quick rejections have closed and slow wins not yet, which biases every weight);
    `model_text` is the current model's file, `mql_win_rate` the share of today's decided
    MQLs that were won."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import brier_score_loss, roc_auc_score
    from sklearn.model_selection import train_test_split

    leads = _closed(logs)
    event_rules = sorted(t for t in model.events if any(lead.events.get(t) for lead in leads))
    fit_rules = [r for r in model.fit if any(r.matches(lead.facts) for lead in leads)]
    names = event_rules + [f"fit:{r.name}" for r in fit_rules]
    won = sum(lead.won for lead in leads)
    rarer, needed = min(won, len(leads) - won), max(MIN_EACH, PER_RULE * len(names))
    if rarer < needed:
        raise TooFewOutcomes(f"too few closed leads to learn from: {won} won and {len(leads) - won} lost or "
                             f"disqualified; {needed} of each are needed ({PER_RULE} per rule learned, "
                             f"{len(names)} rules)")
    rows = [[1.0 if lead.events.get(t) else 0.0 for t in event_rules] + [1.0 if r.matches(lead.facts) else 0.0
                                                                         for r in fit_rules] for lead in leads]
    y = [int(lead.won) for lead in leads]
    x_train, x_test, y_train, y_test = train_test_split(rows, y, test_size=0.3, stratify=y, random_state=seed)
    learner = LogisticRegression(C=1.0, max_iter=2000).fit(x_train, y_train)
    p_test = learner.predict_proba(x_test)[:, 1]
    ranked = sorted(zip(p_test, y_test))
    calibration = []
    for k in range(5):  # five bins of equal size by predicted probability
        part = ranked[k * len(ranked) // 5:(k + 1) * len(ranked) // 5]
        if part:
            calibration.append(Calibration(predicted=round(sum(p for p, _ in part) / len(part), 4),
                                           observed=round(sum(t for _, t in part) / len(part), 4), leads=len(part)))
    learner = LogisticRegression(C=1.0, max_iter=2000).fit(rows, y)  # the weights: from every outcome

    threshold = model.thresholds.mql
    cut = math.log(mql_win_rate / (1 - mql_win_rate)) - float(learner.intercept_[0])
    scale = threshold / cut if cut > 0 else threshold / max(float(c) for c in learner.coef_[0])
    weights = []
    for i, name in enumerate(names):
        coef = float(learner.coef_[0][i])
        showing = [lead for lead, row in zip(leads, rows) if row[i]]
        if name.startswith("fit:"):
            typical, current = 1.0, next(r.points for r in fit_rules if f"fit:{r.name}" == name)
        else:
            rule = model.events[name]
            cap = rule.cap or math.inf
            typical = sum(min(lead.events[name], cap) for lead in showing) / len(showing)
            current = rule.points
        weights.append(RuleWeight(rule=name, leads=len(showing),
                                  won_share=round(sum(lead.won for lead in showing) / len(showing), 4),
                                  coefficient=round(coef, 4), odds_ratio=round(math.exp(coef), 3),
                                  typical_count=round(typical, 2), points=round(scale * coef / typical, 1),
                                  current_points=current))
    text = _candidate_text(model_text, weights, version, scale)
    parse_model(text, "the suggested model")  # it must be a valid model
    return Suggestion(
        closed=len(leads), won=won, train=len(y_train), holdout=len(y_test),
        auc_holdout=round(float(roc_auc_score(y_test, p_test)), 4),
        brier_holdout=round(float(brier_score_loss(y_test, p_test)), 4),
        calibration=calibration,
        threshold=threshold, mql_win_rate=round(mql_win_rate, 4), points_per_log_odds=round(scale, 3),
        weights=sorted(weights, key=lambda w: -w.coefficient), model_text=text,
    )


def _candidate_text(text: str, weights: list[RuleWeight], version: str, scale: float) -> str:
    """The current model's file with the learned points and a comment per rule."""
    by_rule = {w.rule: w for w in weights}
    out, section, fit_name = [], None, None
    for line in text.splitlines():
        header = re.match(r"^\s*\[\[?([^\]]+)\]\]?", line)
        if header:
            section, fit_name = header.group(1).strip(), None
        name = re.match(r'^\s*name\s*=\s*"([^"]+)"', line)
        if section == "fit" and name:
            fit_name = name.group(1)
        if section is None and re.match(r"^\s*version\s*=", line):
            line = f'version = "{version}"  # suggested by leadflow suggest from closed outcomes'
        points = re.match(r"^(\s*)points\s*=", line)
        key = (section.removeprefix("events.") if section and section.startswith("events.")
               else f"fit:{fit_name}" if section == "fit" and fit_name else None)
        if points and key in by_rule:
            w = by_rule[key]
            why = (f"learned: odds of winning x{w.odds_ratio:g} ({w.coefficient:+.2f} log-odds) for showing it, "
                   f"{w.leads} closed leads, {w.won_share:.0%} won"
                   + (f"; spread over {w.typical_count:g} events" if w.typical_count != 1 else "")
                   + f"; was {w.current_points:g}")
            line = f"{points.group(1)}points = {w.points:g}  # {why}"
        out.append(line)
    out.insert(0, f"# Suggested by `leadflow suggest`: {scale:.1f} points per unit of log-odds; review before applying.")
    return "\n".join(out) + "\n"
