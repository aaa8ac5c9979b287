"""The managers' dashboard (/ui) in a real headless Chromium (Debian's `chromium`, driven
by Playwright), against the API served by uvicorn, the Temporal dev server and a worker.

Two stores: the hand-counted population of tests/test_report_kpis.py written straight into
one (its figures are known, and `leadflow report --json` on the same store must agree with
the page), and leads made live through the API for the lead list and a lead's page. Every
page visited must load without a console error; the funnel and a lead's page are saved as
screenshots for the README (docs/screenshots/).
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import uuid
from contextlib import asynccontextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import pytest

from activities.store import AuditStore
from api import create_app
from tests.conftest import running_worker, until
from tests.test_api import KEYRING, KEYS, ev, serving
from tests.test_cli_process import cli_env, leadflow
from tests.test_report_kpis import PLANS, play

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOTS = ROOT / "docs" / "screenshots"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
async def browser():
    from playwright.async_api import async_playwright

    assert CHROMIUM, "Debian's chromium package is needed (scripts/test installs it: apt-get install chromium)"
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield browser
        await browser.close()


class Tab:
    """A browser tab that records every console error and uncaught page error."""

    def __init__(self, page, base_url: str):
        self.page, self.base_url, self.errors = page, base_url, []
        page.on("console", lambda msg: self.errors.append(f"console: {msg.text}") if msg.type == "error" else None)
        page.on("pageerror", lambda err: self.errors.append(f"page error: {err}"))

    async def open(self, path: str):
        response = await self.page.goto(self.base_url + path)
        await self.page.wait_for_load_state("load")
        return response

    async def sign_in(self, who: str, then: str = "/ui/") -> None:
        await self.open(f"/ui/sign-in?next={then}")
        await self.page.fill("input[name=key]", KEYS[who][1])
        await self.page.click("button[type=submit]")
        await self.page.wait_for_load_state("load")

    async def text(self, selector: str) -> str:
        return " ".join((await self.page.locator(selector).first.text_content() or "").split())

    def clean(self) -> None:
        assert self.errors == [], self.errors


@asynccontextmanager
async def tab(browser, base_url: str):
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    t = Tab(await context.new_page(), base_url)
    try:
        yield t
    finally:
        await context.close()
    t.clean()


@pytest.fixture
async def hand_counted(dev_env, settings, tmp_path):
    """The API over a store holding the 19 hand-counted leads (no worker needed: the pages
    read the store, and the SLA board asks leads that Temporal does not know)."""
    url = f"sqlite:///{tmp_path / 'hand.db'}"
    store = AuditStore(url)
    store.write_audit([e for plan in PLANS for i in range(plan.n) for e in play(plan, i)])
    app = create_app(settings=settings, keys=KEYRING, temporal=dev_env.client, store=store)
    async with serving(app) as base_url:
        yield base_url, url
    store.dispose()


def report_json(database_url: str) -> dict:
    done = subprocess.run(leadflow("report", "--json"), cwd=ROOT, env=cli_env(LEADFLOW_DATABASE_URL=database_url),
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def pct(rate: float | None) -> str:
    return "–" if rate is None else f"{rate:.0%}"


async def cells(t: Tab, table: str, group: str, fields: list[str]) -> list[str]:
    row = t.page.locator(f"[data-testid={table}] tr[data-group='{group}']")
    return [(await row.locator(f"[data-field={f}]").inner_text()).strip() for f in fields]


# --------------------------------------------------------------------------- sign-in, sessions, roles


async def test_sign_in_sets_a_strict_session_cookie_and_sign_out_ends_it(hand_counted, browser):
    base_url, _ = hand_counted
    async with tab(browser, base_url) as t:
        await t.open("/ui/funnel")
        assert t.page.url.startswith(base_url + "/ui/sign-in")  # not signed in: sent to sign in

        await t.page.fill("input[name=key]", "not-a-key-of-anyone-at-all")
        await t.page.click("button[type=submit]")
        assert "invalid API key" in await t.text("[data-testid=error]")
        assert await t.page.context.cookies() == []
        t.errors = [e for e in t.errors if "401" not in e]  # the refusal itself

        await t.page.fill("input[name=key]", KEYS["mia"][1])
        await t.page.click("button[type=submit]")
        await t.page.wait_for_load_state("load")
        assert t.page.url == base_url + "/ui/funnel"  # back where it wanted to go
        assert await t.text("[data-testid=who]") == "mia (manager)"
        (cookie,) = await t.page.context.cookies()
        assert (cookie["httpOnly"], cookie["sameSite"], cookie["path"]) == (True, "Strict", "/ui")
        assert KEYS["mia"][1] not in cookie["value"]  # a random token, not the key

        await t.page.click("text=Sign out")
        await t.page.wait_for_load_state("load")
        assert t.page.url.startswith(base_url + "/ui/sign-in")
        assert await t.page.context.cookies() == []
    async with httpx.AsyncClient(base_url=base_url, cookies={"leadflow_session": cookie["value"]}) as http:
        again = await http.get("/ui/funnel")  # the old token is dead on the server too
        assert (again.status_code, again.headers["location"]) == (303, "/ui/sign-in?next=%2Fui%2Ffunnel")
        assert (await http.get("/ui/sign-in?next=https://evil.example/")).text.count('value="/ui/"') == 1


async def test_pages_by_role(hand_counted, browser):
    """Marketing, presales and sales read leads; the funnel and the SLA board are the
    manager's (the API's table). Nothing but sign-out writes."""
    base_url, _ = hand_counted
    async with tab(browser, base_url) as t:
        await t.sign_in("mautic")
        assert t.page.url == base_url + "/ui/leads"
        assert await t.page.locator("nav a").all_inner_texts() == ["Leads", "Accounts"]
        for path in ("/ui/funnel", "/ui/slas"):
            response = await t.open(path)
            assert response.status == 403
            assert "marketing" in await t.text("[data-testid=error]")
        t.errors = [e for e in t.errors if "403" not in e]  # the refusals themselves
    async with tab(browser, base_url) as t:
        await t.sign_in("mia")
        assert await t.page.locator("nav a").all_inner_texts() == ["Funnel", "SLA board", "Leads", "Accounts"]
    forms = [f for f in (ROOT / "api" / "templates").glob("*.html") if 'method="post"' in f.read_text()]
    assert sorted(f.name for f in forms) == ["base.html", "sign_in.html"]  # sign-out and sign-in only


# --------------------------------------------------------------------------- the funnel, KPIs and SLAs


async def test_funnel_page_shows_report_json_and_the_hand_counts(hand_counted, browser):
    base_url, database_url = hand_counted
    report = report_json(database_url)
    async with tab(browser, base_url) as t:
        await t.sign_in("mia", "/ui/funnel")
        for stage in report["overall"]["stages"]:
            name = stage["stage"]
            row = [stage["reached"], pct(stage["conversion_rate"]), stage["in_stage_now"]]
            tr = t.page.locator(f"[data-testid=stages] tr[data-stage='{name}']")
            assert [await tr.locator(f"[data-field={f}]").inner_text()
                    for f in ("reached", "conversion_rate", "in_stage_now")] == [str(row[0]), row[1], str(row[2])]
            if name in ("iql", "mql", "sal", "sql", "won"):
                assert await t.text(f"[data-testid=reached-{name}]") == str(stage["reached"])
        # which channel brings opportunities, how fast (hand count: web 6 of 12, webinar 3 of 5, partner 0 of 2)
        for row in report["opportunities"]["by_channel"]:
            assert await cells(t, "opportunities-by-channel", row["group"],
                               ["leads", "opportunities", "opportunity_rate", "opportunity_rate_within", "win_rate"]) == [
                str(row["leads"]), str(row["opportunities"]), pct(row["opportunity_rate"]),
                pct(row["opportunity_rate_within"]), pct(row["win_rate"])]
        assert [await cells(t, "opportunities-by-channel", ch, ["leads", "opportunities"])
                for ch in ("web", "webinar", "partner")] == [["12", "6"], ["5", "3"], ["2", "0"]]
        assert await t.page.locator("[data-testid=opportunity-chart] line.benchmark").count() == 1
        # how many MQLs presales rejects and why (hand count: ole 4 of 7 decided, no_budget)
        for row in report["presales"]["by_owner"]:
            assert await cells(t, "presales-by-owner", row["group"], ["handed_over", "accepted", "rejected", "rejection_rate"]) == [
                str(row["handed_over"]), str(row["accepted"]), str(row["rejected"]), pct(row["rejection_rate"])]
        assert await cells(t, "presales-by-owner", "ole", ["accepted", "rejected"]) == ["3", "4"]
        assert "no_budget 4" in await t.text("[data-testid=presales-by-owner] tr[data-group=ole]")
        assert await t.text("[data-testid=sla-open-breaches]") == str(report["slas"]["overall"]["open_breaches"])
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        await t.page.screenshot(path=str(SCREENSHOTS / "funnel.png"), full_page=True)

        await t.open("/ui/funnel?channel=webinar&cohort=week")
        webinar = next(c for c in report["by_channel"] if c["channel"] == "webinar")
        assert [await t.text(f"[data-testid=reached-{s['stage']}]") for s in webinar["stages"][:5]] == [
            str(s["reached"]) for s in webinar["stages"][:5]]
        assert all("-W" in g for g in await t.page.locator("[data-testid=cohorts] tr[data-group]").evaluate_all(
            "rows => rows.map(r => r.dataset.group)"))
        await t.open("/ui/funnel")  # the month cohorts, each drawn as its own funnel
        for row in report["opportunities"]["by_cohort"]:
            drawn = await t.text(f"[data-testid=cohort-funnels] g[data-cohort='{row['group']}']")
            assert f"{row['leads']} leads" in drawn and f"{row['opportunities']} opportunities" in drawn
            assert f"{row['won']} won" in drawn

        # who misses SLAs (hand count: anna's two webinar leads G4 sit on a breach nobody acted on)
        await t.open("/ui/slas")
        for row in report["slas"]["by_owner"]:
            assert await cells(t, "sla-owners", row["group"], ["breached", "met_in_time_rate", "open", "open_breaches"]) == [
                str(row["breached"]), pct(row["met_in_time_rate"]), str(row["open"]), str(row["open_breaches"])]
        assert sorted(await t.page.locator("[data-testid=open-anna] tr.alert").evaluate_all(
            "rows => rows.map(r => r.dataset.lead)")) == ["G4-0", "G4-1"]
        response = await t.open("/ui/funnel?channel=nowhere")
        assert response.status == 404
        t.errors = [e for e in t.errors if "404" not in e]


async def test_without_temporal_the_stored_figures_still_show(browser, settings, tmp_path):
    """The funnel, the SLA board and a lead's stored history need the store only; the lead
    list needs Temporal, and says so on its page."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = sock.getsockname()[1]  # nothing listens here once closed
    store = AuditStore(f"sqlite:///{tmp_path / 'hand.db'}")
    store.write_audit([e for plan in PLANS for i in range(plan.n) for e in play(plan, i)])
    app = create_app(settings=settings.model_copy(update={"temporal_address": f"127.0.0.1:{dead}"}), keys=KEYRING,
                     store=store)
    async with serving(app) as base_url, tab(browser, base_url) as t:
        await t.sign_in("mia", "/ui/funnel")
        assert await t.text("[data-testid=reached-iql]") == "19"
        await t.open("/ui/slas")
        assert "due times are not shown" in await t.text("[data-testid=open-count]")
        response = await t.open("/ui/leads")
        assert response.status == 503 and "Not available right now" in await t.text("[data-testid=error]")
        t.errors = [e for e in t.errors if "503" not in e]
        response = await t.open("/ui/leads/G1-0")
        assert response.status == 200
        assert await t.page.locator("[data-testid=history] tbody tr").count() == store.count_history("G1-0")
        assert "stored history is shown" in await t.page.locator("main").inner_text()
    store.dispose()


# --------------------------------------------------------------------------- leads, live


@pytest.fixture
async def live(dev_env, settings, store):
    async with running_worker(dev_env.client, settings, store):
        app = create_app(settings=settings, keys=KEYRING, temporal=dev_env.client, store=store)
        async with serving(app) as base_url:
            yield base_url


async def test_lead_list_filters_and_pages_by_cursor_and_a_leads_page(live, browser, store):
    base_url = live
    run = uuid.uuid4().hex[:6]  # the dev server is shared by the session: these leads only
    t0 = datetime.now(timezone.utc)
    hot = [f"ui-{run}-hot-{i}" for i in range(2)]
    cold = [f"ui-{run}-cold-{i}" for i in range(5)]
    events = ([ev(f"{lead}-demo", lead, "demo_request", t0, channel="partner") for lead in hot]
              + [ev(f"{lead}-visit", lead, "website_visit", t0, channel="web") for lead in cold])
    async with httpx.AsyncClient(base_url=base_url, headers={"Authorization": f"Bearer {KEYS['mautic'][1]}"},
                                 timeout=60) as http:
        answer = await http.post("/events/batch", json={"events": events})
        assert answer.status_code == 202 and answer.json()["accepted"] == 7, answer.text
        answer = await http.post(f"/leads/{hot[0]}/profile", json={"update_id": f"{hot[0]}-p",
                                                                   "facts": {"title": "CEO", "email": "ceo@example.com"}})
        assert answer.status_code == 202, answer.text

        async def listed(**params) -> list[dict]:
            found, cursor = [], None
            while True:
                page = (await http.get("/leads", params={**params, **({"cursor": cursor} if cursor else {})})).json()
                found += page["leads"]
                cursor = page["next_cursor"]
                if cursor is None:
                    return [lead for lead in found if lead["lead_id"].startswith(f"ui-{run}")]

        await until(lambda: listed(limit=1000),
                    lambda found: len(found) == 7 and all(lead["created_at"] for lead in found)
                    and sum(lead["stage"] == "mql" and lead["owner"] is not None for lead in found) == 2)
        by_three = await listed(limit=3)  # pages of 3, by the cursor
        assert sorted(lead["lead_id"] for lead in by_three) == sorted(hot + cold)
        assert sorted(lead["lead_id"] for lead in await listed(stage="mql", channel="partner")) == sorted(hot)
        assert sorted(lead["lead_id"] for lead in await listed(max_score=10)) == sorted(cold)
        assert await listed(created_from=(t0 + timedelta(days=1)).isoformat()) == []
        bad = await http.get("/leads", params={"cursor": "bm90LWEtdG9rZW4"})
        assert bad.status_code == 422 and "cursor" in bad.text

    async with tab(browser, base_url) as t:
        await t.sign_in("anna", "/ui/leads?channel=web&limit=2")
        seen: list[str] = []
        while True:
            seen += [x for x in await t.page.locator("[data-testid=leads] tr[data-lead]").evaluate_all(
                "rows => rows.map(r => r.dataset.lead)") if x.startswith(f"ui-{run}")]
            if await t.page.locator("[data-testid=next-page]").count() == 0:
                break
            await t.page.click("[data-testid=next-page]")
            await t.page.wait_for_load_state("load")
        assert sorted(seen) == sorted(cold)  # every web lead once, two to a page

        await t.open(f"/ui/leads?stage=mql&owner=&min_score=50&created_from={t0:%Y-%m-%d}")
        shown = await t.page.locator("[data-testid=leads] tr[data-lead]").evaluate_all("rows => rows.map(r => r.dataset.lead)")
        assert sorted(x for x in shown if x.startswith(f"ui-{run}")) == sorted(hot)

        await t.page.click(f"a[href='/ui/leads/{hot[0]}']")
        await t.page.wait_for_load_state("load")
        assert (await t.text("[data-testid=state] [data-field=stage]")).startswith("mql")
        total = (await http_history(base_url, hot[0]))["total"]
        assert await t.page.locator("[data-testid=history] tbody tr").count() == total
        assert await t.page.locator("[data-testid=score-chart] circle").count() >= 1
        assert "MQL" in await t.text("[data-testid=timeline]")
        assert "decision" in (await t.text("[data-testid=deadlines]")).lower()
        handover = await t.text("[data-testid=handover]")
        assert "ceo@example.com" in handover or "CEO" in handover
        await t.page.screenshot(path=str(SCREENSHOTS / "lead.png"), full_page=True)

    async with tab(browser, base_url) as t:  # marketing reads no personal data back
        await t.sign_in("mautic", f"/ui/leads/{hot[0]}")
        page_text = await t.page.locator("main").inner_text()
        assert "ceo@example.com" not in page_text and "***" in page_text


async def http_history(base_url: str, lead: str) -> dict:
    async with httpx.AsyncClient(base_url=base_url, headers={"Authorization": f"Bearer {KEYS['mia'][1]}"}) as http:
        return (await http.get(f"/leads/{lead}/history", params={"limit": 1000})).json()


async def test_accounts_page_shows_an_mqa_made_by_two_contacts(live, browser):
    base_url = live
    domain = f"ui-{uuid.uuid4().hex[:6]}.example"
    t0 = datetime.now(timezone.utc) - timedelta(minutes=5)
    async with httpx.AsyncClient(base_url=base_url, headers={"Authorization": f"Bearer {KEYS['mautic'][1]}"},
                                 timeout=60) as http:
        for lead, role, extra in ((f"{domain}-a", "decision_maker", {"target_account": True}),
                                  (f"{domain}-b", "champion", {})):
            answer = await http.post(f"/leads/{lead}/profile", json={"facts": {
                "email": f"{role}@{domain}", "role": role, **extra}})
            assert answer.status_code == 202, answer.text
            answer = await http.post("/events", json=ev(f"{lead}-1", lead, "webinar_attended", t0))
            assert answer.status_code == 202, answer.text
        await until(lambda: http.get(f"/accounts/{domain}"),
                    lambda r: r.status_code == 200 and r.json()["stage"] == "mqa" and r.json()["owner"])
        counts = await until(lambda: http.get("/accounts"), lambda r: r.json()["mqa"] >= 1)
    async with tab(browser, base_url) as t:
        await t.sign_in("anna", "/ui/accounts")
        row = t.page.locator(f"[data-testid=accounts] tr[data-account='{domain}']")
        assert (await row.locator("[data-field=stage]").inner_text()).strip() == "mqa"
        assert (await row.locator("[data-field=roles]").inner_text()).strip() == "champion, decision_maker (2 of 2)"
        assert f"{domain}-a" in await row.locator("[data-field=contacts]").inner_text()
        assert f"{counts.json()['mqa']} marketing-qualified" in await t.text("[data-testid=account-counts]")
        await t.page.screenshot(path=str(SCREENSHOTS / "accounts.png"), full_page=True)
