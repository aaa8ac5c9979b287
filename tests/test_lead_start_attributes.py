"""A new lead is started with the search attributes it will have (lead version 11), so it
costs no upsert (a visibility write and a history event) of its own; a wrong guess is put
right by the lead. On the real dev server: its clock is the client's, as in production."""

from __future__ import annotations

from datetime import timedelta, timezone

import pytest
from temporalio.common import SearchAttributePair, TypedSearchAttributes

import client as leads
from client import LeadFilters
from funnel.models import ProfileUpdate, Stage
from funnel.scoring_model import load_model
from tests.conftest import event, running_worker, settle, until
from workflows import search_attributes as sa
from workflows.lead import LeadWorkflow, workflow_id
from workflows.lead_input import CURRENT_VERSION, LeadInput


def upserts(history) -> list[dict]:
    return [dict(e.upsert_workflow_search_attributes_event_attributes.search_attributes.indexed_fields)
            for e in history.events if e.HasField("upsert_workflow_search_attributes_event_attributes")]


def started_with(history) -> set[str]:
    started = history.events[0].workflow_execution_started_event_attributes
    return set(started.search_attributes.indexed_fields)


async def listed(client, lead: str, **filters) -> list[str]:
    page = await leads.lead_page(client, LeadFilters(lead_ids=[lead], **filters), size=10)
    return [s.lead_id for s in page.leads]


async def test_a_new_lead_starts_with_its_attributes_and_upserts_none(dev_env, settings, store):
    """Events and a profile update, each starting a lead as the API does (with the model):
    the start carries stage, score, channel, model and creation time as the lead computes
    them, the lead's history has no upsert, and lists filter it by all of them."""
    client = dev_env.client
    model = load_model(settings.model_path)
    visit, profiled = "SA-visit", "SA-profile"
    async with running_worker(client, settings, store):
        now = await dev_env.get_current_time()
        await leads.send_events(client, settings, [event(visit, "1", "website_visit", now, channel="ads"),
                                                   event(visit, "2", "webinar_attended", now, channel="webinar")],
                                model)
        await leads.send_profile(client, settings, ProfileUpdate(update_id="p", lead_id=profiled,
                                                                  facts={"target_account": True}), model)
        views = {lead: await settle(dev_env, client, lead, lambda v: v.events_applied + len(v.profile) > 0)
                 for lead in (visit, profiled)}
        histories = {lead: await client.get_workflow_handle(workflow_id(lead)).fetch_history() for lead in views}
        for lead, view in views.items():
            assert upserts(histories[lead]) == [], lead
            assert {"LeadStage", "LeadScore", "LeadModel", "LeadCreated"} <= started_with(histories[lead])
            score, created = view.score["total"], view.history[0].entered_at
            assert score > 0
            found = await until(lambda lead=lead: listed(client, lead), lambda found: found == [lead])
            assert found == [lead]
            assert await listed(client, lead, stage=Stage.IQL.value, min_score=score, max_score=score,
                                created_from=created - timedelta(seconds=1), created_to=created + timedelta(seconds=1)) == [lead]
            described = await client.get_workflow_handle(workflow_id(lead)).describe()
            attrs = described.typed_search_attributes
            assert attrs.get(sa.LEAD_CREATED) == view.history[0].entered_at
            assert attrs.get(sa.LEAD_MODEL) == model.ref
            assert attrs.get(sa.LEAD_OWNER) is None
        assert views[visit].channel == "ads"
        assert await listed(client, visit, channel="ads") == [visit]
        assert views[profiled].score["fit"] > 0 and views[profiled].channel is None


async def test_a_wrong_guess_is_put_right_by_the_lead(dev_env, settings, store):
    """Started with attributes that do not match (another starter's guess, a skewed clock):
    the lead upserts every one that differs at its first refresh, the score going along."""
    client = dev_env.client
    lead = "SA-wrong"
    model = load_model(settings.model_path)
    async with running_worker(client, settings, store):
        now = await dev_env.get_current_time()
        wrong = TypedSearchAttributes([SearchAttributePair(sa.LEAD_STAGE, "mql"), SearchAttributePair(sa.LEAD_SCORE, 999.0),
                                       SearchAttributePair(sa.LEAD_CHANNEL, "nowhere")])
        await client.start_workflow(
            LeadWorkflow.run, LeadInput(lead_id=lead, model=model, version=CURRENT_VERSION, created_at=now),
            id=workflow_id(lead), task_queue=settings.task_queue, search_attributes=wrong,
            start_signal="event", start_signal_args=[event(lead, "1", "website_visit", now)])
        view = await settle(dev_env, client, lead, lambda v: v.events_applied == 1)
        handle = client.get_workflow_handle(workflow_id(lead))

        async def attributes():
            return (await handle.describe()).typed_search_attributes

        attrs = await until(attributes, lambda a: a.get(sa.LEAD_SCORE) == view.score["total"])
        assert attrs.get(sa.LEAD_STAGE) == Stage.IQL.value
        assert attrs.get(sa.LEAD_CHANNEL) == "website"
        assert attrs.get(sa.LEAD_MODEL) == model.ref
        assert attrs.get(sa.LEAD_CREATED) == view.history[0].entered_at
        (upserted,) = upserts(await handle.fetch_history())
        assert {"LeadStage", "LeadScore", "LeadChannel", "LeadModel", "LeadCreated"} <= set(upserted)


@pytest.mark.parametrize("skew_minutes", [-5, 5])
async def test_a_starter_clock_far_off_does_not_date_the_lead(dev_env, settings, store, skew_minutes):
    """A lead is created at its starter's time only when that is within a minute of its first
    task; otherwise at the task's time (then it upserts its creation time)."""
    client = dev_env.client
    lead = f"SA-skew{skew_minutes}"
    model = load_model(settings.model_path)
    async with running_worker(client, settings, store):
        now = await dev_env.get_current_time()
        await client.start_workflow(
            LeadWorkflow.run,
            LeadInput(lead_id=lead, model=model, version=CURRENT_VERSION, created_at=now + timedelta(minutes=skew_minutes)),
            id=workflow_id(lead), task_queue=settings.task_queue,
            start_signal="event", start_signal_args=[event(lead, "1", "website_visit", now)])
        view = await settle(dev_env, client, lead, lambda v: v.events_applied == 1)
    assert abs(view.history[0].entered_at - now) < timedelta(seconds=30)


async def test_a_guess_that_fails_never_keeps_input_from_its_lead(dev_env, settings, store, monkeypatch, caplog):
    """The prediction is only a saving: should it raise, the lead starts without attributes,
    takes its events and upserts them itself."""
    client = dev_env.client
    lead = "SA-noguess"

    def broken(*args, **kwargs):
        raise RuntimeError("prediction broke")

    monkeypatch.setattr(leads, "new_lead", broken)
    async with running_worker(client, settings, store):
        now = await dev_env.get_current_time()
        await leads.send_events(client, settings, [event(lead, "1", "website_visit", now)], load_model(settings.model_path))
        view = await settle(dev_env, client, lead, lambda v: v.events_applied == 1)
        history = await client.get_workflow_handle(workflow_id(lead)).fetch_history()
    assert "prediction broke" in caplog.text
    assert started_with(history) <= {"BuildIds"}
    (upserted,) = upserts(history)
    assert {"LeadStage", "LeadScore", "LeadChannel", "LeadModel", "LeadCreated"} <= set(upserted)
    assert view.stage == Stage.IQL


async def test_a_continued_run_keeps_the_attributes_it_inherits(dev_env, settings, store):
    """A run that continues as new inherits its search attributes; with nothing but the score
    changed, it upserts no stage, channel, model or creation time again (the runs of older
    versions upserted all of them at their first refresh). The dev server suggests continue-
    as-new after 40 history events."""
    from tests.test_workflow_durability import runs_of

    client, lead = dev_env.client, "SA-can"
    model = load_model(settings.model_path)
    async with running_worker(client, settings, store):
        now = await dev_env.get_current_time()
        await leads.send_events(client, settings, [event(lead, "0", "email_open", now)], model)
        for b in range(1, 40):
            await leads.send_events(client, settings, [event(lead, f"{b}-{i}", "email_open", now) for i in range(2)])
        await settle(dev_env, client, lead, lambda v: v.events_applied == 79, tries=300)
        runs = await runs_of(client, lead, at_least=2)
        assert len(runs) >= 2, "the events crossed a continue-as-new"
        histories = [await client.get_workflow_handle(workflow_id(lead), run_id=run.run_id).fetch_history()
                     for run in runs]
    again = [set(u) - {"LeadScore"} for history in histories for u in upserts(history)]
    assert not any(again), again
    assert all("LeadStage" in started_with(h) for h in histories)


@pytest.mark.parametrize("micros", [1, 999, 1500, 999_999])
async def test_a_creation_time_filter_holds_to_the_microsecond(dev_env, settings, store, monkeypatch, micros):
    """The dev server's visibility compares LeadCreated at about a millisecond, rounding
    (a lead created at .001500 was listed from .002000; one at .999999 was not listed from
    its own creation time): the list asks visibility with a margin and keeps exactly what
    the filter says, so a lead is listed from its own creation time and not a microsecond later."""
    real = leads.datetime

    class StarterClock(real):  # the starter's clock, at a chosen microsecond of the second before
        @classmethod
        def now(cls, tz=None):
            return (real.now(tz) - timedelta(seconds=1)).replace(microsecond=micros)

    client = dev_env.client
    lead = f"SA-created-{micros}"
    async with running_worker(client, settings, store):
        monkeypatch.setattr(leads, "datetime", StarterClock)
        await leads.send_events(client, settings, [event(lead, "1", "website_visit", real.now(timezone.utc))],
                                load_model(settings.model_path))
        monkeypatch.setattr(leads, "datetime", real)
        view = await settle(dev_env, client, lead, lambda v: v.events_applied == 1)
        created = view.history[0].entered_at
        assert created.microsecond == micros  # created at the starter's time
        assert await until(lambda: listed(client, lead), lambda found: found == [lead]) == [lead]

        assert await listed(client, lead, created_from=created, created_to=created + timedelta(microseconds=1)) == [lead]
        assert await listed(client, lead, created_from=created + timedelta(microseconds=1)) == []
        assert await listed(client, lead, created_to=created) == []
