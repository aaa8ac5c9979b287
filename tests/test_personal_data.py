"""What counts as personal data, and erasing it from a lead's state, directly on the pure core:
`Lead.erase_personal_data` and funnel/personal_data.py (masking for roles that may not read
it, scrubbing the store's copies). The audit details are produced by the real core here, so a
change of their wording that the scrubber would miss fails these tests."""

from __future__ import annotations

import json

from funnel.models import Accept, AuditKind, Close, LogContact, ProfileUpdate, Qualify, Reject, Role, Stage
from funnel.personal_data import (
    ERASED,
    MASK,
    erase_from_state,
    fit_categories,
    mask_view,
    scrub_entry,
    scrub_payload,
)
from tests.funnel_helpers import (
    BANT_3,
    LEAD,
    MANAGER,
    MARKETING,
    PRESALES,
    SALES,
    T0,
    days,
    default_model,
    event,
    hours,
    new_lead,
    of_kind,
)

EMAIL, NAME, NOTE, FORM = "ann@example.test", "Ann Beispiel", "Ann's private mobile is 0170 5550123", "webform Ann B."
PII = [EMAIL, NAME, NOTE, FORM, "0170"]


def a_lead_with_personal_data():
    lead = new_lead()
    lead.update_profile(ProfileUpdate(update_id="p-1", lead_id=LEAD, actor=MARKETING, facts={
        "email": EMAIL, "name": NAME, "target_account": True, "industry": "Software", "company_size": 250,
        "email_consent": True, "email_consent_source": FORM}), T0)
    lead.ingest_many([event("e-1", "content_download", T0, channel="website", form=FORM, email=EMAIL),
                      event("e-2", "demo_request", T0 + hours(1), channel="website")], T0 + hours(1))
    lead.tick(T0 + hours(2))
    assert lead.state.stage == Stage.MQL
    lead.execute(Accept(by=PRESALES, note=NOTE), T0 + hours(3))
    return lead


def test_erasure_drops_the_persons_data_and_keeps_scores_stages_and_rule_names():
    lead = a_lead_with_personal_data()
    effects = lead.take_effects()
    before = lead.state.model_copy(deep=True)
    at = T0 + hours(4)

    erased = lead.erase_personal_data(at, MANAGER)

    s = lead.state
    assert erased.profile_facts == 4 and erased.events == 1  # email, name, both consent facts; e-1's attributes
    assert s.profile == {"target_account": True, "industry": "software", "company_size": 50}
    assert set(s.profile_seen) == set(s.profile)
    assert all(not e.attributes for e in s.engagement.window)
    assert [e.event_id for e in s.engagement.window] == [e.event_id for e in before.engagement.window]
    assert s.score == before.score and s.stage == before.stage and s.history == before.history
    assert s.consent_fact.email is True and s.consent_fact.source == f"profile update p-1 ({ERASED})"
    assert s.personal_data_erased_at == at
    assert [value for value in PII if value in s.model_dump_json()] == []
    [entry] = of_kind(lead.take_effects(), AuditKind.PERSONAL_DATA_ERASED)
    assert entry.actor == "mona" and entry.role == Role.MANAGER and entry.reason == "gdpr_art_17"
    assert "4 profile fact value(s), attributes of 1 event(s)" in entry.detail
    assert [value for value in PII if value in entry.detail] == []
    assert effects.audit  # the lead recorded the facts before: the store is scrubbed separately


def test_after_erasure_a_refit_keeps_the_fit_score_and_blocks_still_block():
    lead = a_lead_with_personal_data()
    lead.update_profile(ProfileUpdate(update_id="p-2", lead_id=LEAD, facts={"student": True}), T0 + hours(3))
    fit = lead.state.score.fit
    lead.erase_personal_data(T0 + hours(4), MANAGER)
    assert lead.state.profile["student"] is True  # a fit rule's category: kept
    model_2 = default_model().model_copy(update={"version": "2"})
    lead.use_model(model_2, T0 + hours(5))  # a model change refits from the profile
    assert lead.state.score.fit == fit
    assert lead.view().score["fit"] == fit
    # and a later profile update is new data, taken as ever
    lead.update_profile(ProfileUpdate(update_id="p-3", lead_id=LEAD, facts={"email": "new@example.test"}),
                        T0 + hours(6))
    assert lead.state.profile["email"] == "new@example.test"


def test_fit_categories_are_the_models_words_and_never_change_what_matches():
    rules = default_model().fit
    kept = fit_categories({"industry": "FINANCE", "company_size": 4999, "country": "de", "name": NAME,
                           "seniority": "intern"}, rules)
    assert kept == {"industry": "finance", "company_size": 50, "country": "DE"}
    assert {r.name for r in rules if r.matches(kept)} == {"industry", "company_size", "country_served"}


def test_erasure_counts_nothing_twice_and_keeps_new_data_apart():
    lead = a_lead_with_personal_data()
    lead.erase_personal_data(T0 + hours(4), MANAGER)
    again = lead.erase_personal_data(T0 + hours(5), MANAGER)
    assert again.profile_facts == 0 and again.events == 0


# --------------------------------------------------------------------------- the store's copies: audit details


def entries_with_personal_data():
    """Every kind of entry whose detail carries personal data, made by the real core."""
    lead = a_lead_with_personal_data()
    lead.execute(Qualify(by=PRESALES, bant=BANT_3, note=NOTE), T0 + hours(4))
    lead.execute(LogContact(by=SALES, note=NOTE), T0 + hours(5))
    lead.execute(Close(by=SALES, outcome="lost", reason="no_budget", note=NOTE), T0 + hours(6))
    recycled = new_lead(lead_id="L-8")
    recycled.update_profile(ProfileUpdate(update_id="p-9", lead_id="L-8", facts={
        "email_consent": False, "email_consent_source": FORM}), T0)
    recycled.tick(T0 + days(2))  # the welcome nurture step is skipped: no consent (its source is free text)
    mql = new_lead(lead_id="L-9")
    mql.ingest(event("d-1", "demo_request", T0, lead_id="L-9"), T0)
    mql.tick(T0 + hours(1))
    mql.execute(Reject(by=PRESALES, reason="not_now", recycle=True, note=NOTE), T0 + hours(2))
    return lead.take_effects().audit + recycled.take_effects().audit + mql.take_effects().audit


def test_every_detail_with_personal_data_is_scrubbed_and_only_that():
    entries = entries_with_personal_data()
    carrying = [e for e in entries if any(value in e.detail for value in PII)]
    assert {e.kind for e in carrying} == {AuditKind.PROFILE_UPDATED, AuditKind.STAGE_CHANGED,
                                          AuditKind.CONTACT_LOGGED, AuditKind.NURTURE_STEP_SKIPPED,
                                          AuditKind.CONSENT_CHANGED}
    for replacement in (MASK, ERASED):
        scrubbed = [scrub_entry(e, replacement) for e in entries]
        assert [e.detail for e in scrubbed if any(v in e.detail for v in PII)] == []
        untouched = [(a.detail, b.detail) for a, b in zip(entries, scrubbed) if a not in carrying]
        assert all(a == b for a, b in untouched)
        for original, after in zip(entries, scrubbed):
            assert after.model_dump(exclude={"detail"}) == original.model_dump(exclude={"detail"})


def test_masked_details_still_say_what_happened():
    entries = {}
    for entry in entries_with_personal_data():
        entries.setdefault(entry.kind, entry)
    profile = scrub_entry(entries[AuditKind.PROFILE_UPDATED]).detail
    assert profile.startswith("profile: company_size=***, email=***, email_consent=***")
    contact = scrub_entry(entries[AuditKind.CONTACT_LOGGED]).detail
    assert contact == "phone contact by sam: ***"
    stages = [scrub_entry(e).detail for e in entries_with_personal_data() if e.kind == AuditKind.STAGE_CHANGED
              and NOTE in e.detail]
    assert stages and all(d.endswith("; note: ***") for d in stages)
    skipped = scrub_entry(entries[AuditKind.NURTURE_STEP_SKIPPED]).detail
    assert skipped.endswith("(profile update p-9 (***))")
    assert scrub_entry(entries[AuditKind.PROFILE_UPDATED], ERASED).detail == "profile: fact values erased"


# --------------------------------------------------------------------------- views and outbound messages


def test_a_masked_view_shows_names_not_values():
    lead = a_lead_with_personal_data()
    view = mask_view(lead.view())
    assert set(view.profile) == set(lead.state.profile) and set(view.profile.values()) == {MASK}
    assert view.consent["source"] == "profile update p-1 (***)"
    assert view.score == lead.view().score and view.stage == lead.view().stage
    assert [value for value in PII if value in view.model_dump_json()] == []


def test_outbound_payloads_lose_values_and_attributes():
    lead = a_lead_with_personal_data()
    lead.take_effects()
    new = new_lead(lead_id="L-10")
    new.update_profile(ProfileUpdate(update_id="p", lead_id="L-10", facts={"email": EMAIL}), T0)
    new.ingest_many([event("x-1", "webinar_attended", T0, lead_id="L-10", form=FORM),
                     event("x-2", "demo_request", T0, lead_id="L-10")], T0)
    new.tick(T0 + hours(1))
    [handover] = [m for m in new.take_effects().outbound if m.kind.value == "handover"]
    assert EMAIL in json.dumps(handover.payload) and FORM in json.dumps(handover.payload)
    for replacement in (MASK, ERASED):
        scrubbed = scrub_payload(handover.payload, replacement)
        assert [v for v in PII if v in json.dumps(scrubbed)] == []
        assert scrubbed["profile"] == {"email": replacement}
        assert [a["type"] for a in scrubbed["activities"]] == [a["type"] for a in handover.payload["activities"]]
        assert scrubbed["score"] == handover.payload["score"]
