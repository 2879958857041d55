"""The console's web application: Starlette, Jinja2 templates rendered on the server, one small script.

Pages: the review queue (/), an alert (/alerts/ID) with its verdict buttons, the rules (/rules) with their
history and an editor, the dashboard (/dashboard); /events streams new alerts (server-sent events) to the
queue. Handlers that touch SQLite or Kafka are plain functions (Starlette runs them in its thread pool).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp

from fraudstream.console import charts
from fraudstream.console.auth import ANALYST, RULES_ADMIN, Authenticator, User
from fraudstream.console.index import BANDS, PAGE_SIZE, Bands, Index, QueueFilter
from fraudstream.console.verdicts import VerdictNotWritten, VerdictWriter, verdict_label
from fraudstream.errors import FraudstreamError
from fraudstream.settings import Settings

log = logging.getLogger("fraudstream.console")

STATIC_DIR = Path(__file__).parent / "static"
ANALYST_COOKIE = "fraudstream_analyst"
SSE_KEEPALIVE_S = 15.0
MAX_NAME = 100
MAX_CENTS = 10**15  # beyond any payment, and within SQLite's integers


@dataclass
class ConsoleState:
    """Everything the handlers share."""

    settings: Settings
    index: Index
    authenticator: Authenticator
    writer: VerdictWriter
    reader: Any = None  # TopicReader (None in tests that fill the index themselves)
    rules_writer: Any = None  # callable(toml_text, author, comment) -> list[Rule]; the rules CLI's path
    rules_reader: Any = None  # callable() -> (rules in force, history); the rules CLI's path
    subscribers: set[asyncio.Queue] = field(default_factory=set)
    loop: asyncio.AbstractEventLoop | None = None

    @property
    def bands(self) -> Bands:
        """The score bands of the rules in force (a score_bands rule on the rules topic; its defaults without one)."""
        return self.index.bands()

    def publish(self, alerts: list[dict[str, Any]]) -> None:
        """From the reader thread: hand new alerts to every open /events stream."""
        if self.loop is None or not self.subscribers:
            return
        events = [("alert", alert_summary(a, self.bands)) for a in alerts]
        for queue in list(self.subscribers):
            self.loop.call_soon_threadsafe(queue.put_nowait, events)

    def publish_verdicts(self, transaction_ids: list[str]) -> None:
        """From the reader thread: alerts that got a verdict leave every open queue."""
        if self.loop is None or not self.subscribers:
            return
        events = [("verdict", {"transaction_id": tid}) for tid in transaction_ids]
        for queue in list(self.subscribers):
            self.loop.call_soon_threadsafe(queue.put_nowait, events)


def alert_summary(alert: dict[str, Any], bands: Bands) -> dict[str, Any]:
    tx = alert["transaction"]
    score = 1.0 if alert.get("score") is None else float(alert["score"])
    return {
        "transaction_id": tx["transaction_id"],
        "amount": money(tx["amount_cents"], tx.get("currency", "USD")),
        "card_id": tx["card_id"],
        "merchant_id": tx["merchant_id"],
        "rules": ", ".join(alert["rules"]),
        "score": f"{score:.3f}",
        "band": bands.band(score),
        "detected_at": when(alert["detected_at"]),
    }


def money(cents: int, currency: str = "USD") -> str:
    return f"{cents / 100:,.2f} {currency}"


def when(ms: int | None) -> str:
    if ms is None:
        return "-"
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _parse_time(text: str) -> int | None:
    if not text:
        return None
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        raise BadInput(f"{text!r} is not a date and time (YYYY-MM-DD or YYYY-MM-DDTHH:MM)") from None
    return int((at if at.tzinfo else at.replace(tzinfo=UTC)).timestamp() * 1000)


def _parse_amount(text: str) -> int | None:
    if not text:
        return None
    try:
        cents = float(text) * 100
    except ValueError:
        cents = math.nan
    if not math.isfinite(cents) or abs(cents) > MAX_CENTS:
        raise BadInput(f"{text!r} is not an amount")
    return round(cents)


def _parse_page(text: str) -> int:
    if not text.isdigit() or len(text) > 9:
        raise BadInput(f"page {text!r} is not a page number")
    return int(text)


class BadInput(Exception):
    """A request's parameter that cannot be used: a 400 page with this message."""


def create_app(state: ConsoleState) -> ASGIApp:
    templates = Environment(
        loader=PackageLoader("fraudstream.console", "templates"), autoescape=select_autoescape(["html"])
    )
    templates.globals.update(money=money, when=when, bands=BANDS)

    def page(request: Request, name: str, status: int = 200, **context: Any) -> HTMLResponse:
        reader = state.reader
        context.update(
            user=request.scope["user"],
            state=state,
            request=request,
            catching_up=reader is not None and not reader.state.caught_up,
            kafka_error=reader.state.kafka_error if reader is not None else None,
        )
        return HTMLResponse(templates.get_template(name).render(**context), status_code=status)

    def problem(request: Request, status: int, message: str) -> HTMLResponse:
        return page(request, "message.html", status, message=message, status_code=status)

    def queue(request: Request) -> HTMLResponse:
        q = request.query_params
        try:
            filters = QueueFilter(
                rule=q.get("rule", ""),
                scenario=q.get("scenario", ""),
                card=q.get("card", ""),
                merchant=q.get("merchant", ""),
                min_cents=_parse_amount(q.get("min_amount", "")),
                max_cents=_parse_amount(q.get("max_amount", "")),
                since_ms=_parse_time(q.get("since", "")),
                until_ms=_parse_time(q.get("until", "")),
            )
            page_number = _parse_page(q.get("page", "0") or "0")
        except BadInput as exc:
            return problem(request, 400, str(exc))
        rows, counts = state.index.queue(state.bands, filters, page_number)
        base = {k: v for k, v in q.items() if k != "page" and v}
        return page(
            request,
            "queue.html",
            rows=rows,
            counts=counts,
            filters=q,
            page_number=page_number,
            page_size=PAGE_SIZE,
            total=sum(counts.values()),
            filtered=bool(base),
            rules=state.index.rule_names(),
            scenarios=state.index.scenarios(),
            page_link=lambda n: "/?" + urlencode({**base, "page": n}),
            band_of=state.bands.band,
        )

    def alert(request: Request) -> HTMLResponse:
        tid = request.path_params["transaction_id"]
        row = state.index.alert(tid)
        if row is None:
            return problem(request, 404, f"no alert for transaction {tid!r}: nothing to show")
        body = json.loads(row["body"])
        fired = []
        for rule_id, version in json.loads(row["fired"]) or [[r, None] for r in body["rules"]]:
            found = state.index.rule_version(rule_id, version) if version is not None else None
            fired.append(
                {
                    "id": rule_id,
                    "version": version,
                    "kind": found["kind"] if found else None,
                    "parameters": json.loads(found["parameters"]) if found else None,
                    "author": found["author"] if found else None,
                }
            )
        return page(
            request,
            "alert.html",
            row=row,
            tx=body["transaction"],
            fired=fired,
            band=state.bands.band(row["score"]),
            verdicts=state.index.verdicts(tid),
            label=state.index.label(tid),
            payments=state.index.recent_payments(row["card_id"], row["event_time"]),
            analyst_name=request.cookies.get(ANALYST_COOKIE, ""),
            message=request.query_params.get("message"),
        )

    async def verdict(request: Request) -> Response:
        user: User = request.scope["user"]
        tid = request.path_params["transaction_id"]
        form = await request.form()
        if not user.may(ANALYST):
            return problem(
                request, 403, f"{user.name} may not give verdicts (needs the {ANALYST} role): nothing written"
            )
        choice = form.get("verdict")
        if choice not in ("fraud", "not_fraud"):
            return problem(request, 400, "a verdict is 'fraud' or 'not_fraud': nothing written")
        analyst = user.name
        if user.anonymous:
            analyst = str(form.get("analyst", "")).strip()
            if not analyst or len(analyst) > MAX_NAME:
                return problem(
                    request,
                    400,
                    f"give your name (at most {MAX_NAME} characters) with a verdict: it is "
                    "written with the label; nothing written",
                )
        row = await asyncio.to_thread(state.index.alert, tid)
        if row is None:
            return problem(request, 404, f"no alert for transaction {tid!r}: no verdict written")
        label = verdict_label(json.loads(row["body"]), is_fraud=choice == "fraud", analyst=analyst)
        try:
            await asyncio.to_thread(state.writer.write, label)
        except (VerdictNotWritten, FraudstreamError) as exc:
            return problem(request, 503, str(exc))
        log.info("console: %s marked %s as %s", analyst, tid, choice)
        response = RedirectResponse(
            f"/alerts/{quote(tid)}?message=" + quote(f"verdict '{choice.replace('_', ' ')}' written by {analyst}"),
            status_code=303,
        )
        if user.anonymous:
            response.set_cookie(ANALYST_COOKIE, analyst, httponly=True, samesite="strict")
        return response

    def rules(
        request: Request,
        *,
        editor_text: str | None = None,
        message: str | None = None,
        error: str | None = None,
        status: int = 200,
    ) -> HTMLResponse:
        try:
            in_force, history = state.rules_reader()
        except FraudstreamError as exc:
            return problem(request, 503, f"the rules could not be read: {exc}")
        if editor_text is None:
            editor_text = rules_as_toml(in_force)
        return page(
            request,
            "rules.html",
            status,
            in_force=sorted(in_force.values(), key=lambda r: r.id),
            history=history,
            editor_text=editor_text,
            message=message or request.query_params.get("message"),
            error=error,
            bands_now=state.bands,
        )

    def rules_page(request: Request) -> HTMLResponse:
        return rules(request)

    async def rules_change(request: Request) -> Response:
        user: User = request.scope["user"]
        form = await request.form()
        text, comment = str(form.get("rules", "")), str(form.get("comment", ""))
        if not user.may(RULES_ADMIN):
            return await asyncio.to_thread(
                rules,
                request,
                editor_text=text,
                status=403,
                error=f"{user.name} may not change rules (needs the {RULES_ADMIN} role): nothing written",
            )
        try:
            written = await asyncio.to_thread(state.rules_writer, text, user.name, comment)
        except FraudstreamError as exc:
            return await asyncio.to_thread(rules, request, editor_text=text, status=400, error=str(exc))
        log.info("console: %s wrote %s", user.name, ", ".join(f"{r.id} v{r.version}" for r in written))
        return RedirectResponse(
            "/rules?message="
            + quote("written: " + ", ".join(f"{r.id} v{r.version}" for r in written) + f" (by {user.name})"),
            status_code=303,
        )

    def dashboard(request: Request) -> HTMLResponse:
        hours, per_rule = state.index.alerts_per_hour_by_rule()
        quality = state.index.quality_by_day()
        samples = list(state.reader.state.samples) if state.reader is not None else []
        return page(
            request,
            "dashboard.html",
            alerts_chart=charts.stacked_bars(hours, per_rule, title="alerts per hour of event time, by rule"),
            quality_chart=charts.lines(
                [q["day_ms"] for q in quality],
                {"precision": [q["precision"] for q in quality], "recall": [q["recall"] for q in quality]},
                title="precision and recall per day (labels and verdicts)",
                unit=1.0,
            ),
            lag_chart=charts.lines(
                [int(s.at * 1000) for s in samples],
                {"consumer lag": [s.lag for s in samples]},
                title="detectors' consumer lag (records)",
            ),
            throughput_chart=charts.lines(
                [int(s.at * 1000) for s in samples[1:]],
                {"records/s": [(b.committed - a.committed) / (b.at - a.at) for a, b in zip(samples, samples[1:])]},
                title="detectors' throughput (records/s)",
            ),
            quality=quality,
            alerts_total=state.index.count_alerts(),
        )

    async def events(request: Request) -> Response:
        queue: asyncio.Queue = asyncio.Queue()
        state.subscribers.add(queue)

        async def stream():
            try:
                yield "retry: 1000\n\n"
                while True:
                    try:
                        rows = await asyncio.wait_for(queue.get(), SSE_KEEPALIVE_S)
                    except TimeoutError:
                        yield ": keep-alive\n\n"
                        continue
                    for kind, data in rows:
                        yield f"event: {kind}\ndata: {json.dumps(data)}\n\n"
            finally:
                state.subscribers.discard(queue)

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})

    def status(request: Request) -> JSONResponse:
        reader = state.reader
        return JSONResponse(
            {
                "caught_up": reader is None or reader.state.caught_up,
                "kafka_error": reader.state.kafka_error if reader else None,
                "indexed": reader.state.indexed if reader else {},
                "alerts": state.index.count_alerts(),
            }
        )

    def login(request: Request) -> Response:
        user: User = request.scope["user"]
        if user.anonymous:
            return Response(
                "log in", status_code=401, headers={"WWW-Authenticate": 'Basic realm="fraudstream console"'}
            )
        return RedirectResponse("/", status_code=303)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        state.loop = asyncio.get_running_loop()  # where the reader thread hands new alerts to the streams
        yield

    app = Starlette(
        routes=[
            Route("/", queue),
            Route("/alerts/{transaction_id:path}", alert),
            Route("/verdicts/{transaction_id:path}", verdict, methods=["POST"]),
            Route("/rules", rules_page),
            Route("/rules", rules_change, methods=["POST"]),
            Route("/dashboard", dashboard),
            Route("/events", events),
            Route("/status", status),
            Route("/login", login),
            Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
        ],
        lifespan=lifespan,
    )
    return AuthMiddleware(app, state.authenticator)


def rules_as_toml(rules: dict[str, Any]) -> str:
    """The rules in force in the rules file's format (what `rules set` reads), for the editor."""
    lines = []
    for rule in sorted(rules.values(), key=lambda r: r.id):
        lines.append(f"[{rule.id}]")
        if rule.kind != rule.id:
            lines.append(f"kind = {json.dumps(rule.kind)}")
        lines.append(f"enabled = {'true' if rule.enabled else 'false'}")
        for key, value in sorted(rule.parameters.items()):
            lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(value)


class AuthMiddleware:
    """Every request gets a user (scope["user"]) or a 401: anonymous only from the loopback interface."""

    def __init__(self, app, authenticator: Authenticator) -> None:
        self.app = app
        self.authenticator = authenticator

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        authorization = headers.get(b"authorization", b"").decode("latin-1") or None
        client = scope.get("client")
        user = await asyncio.to_thread(self.authenticator.user_for, client[0] if client else None, authorization)
        if user is None:
            response = Response(
                "authentication required",
                status_code=401,
                headers={"WWW-Authenticate": 'Basic realm="fraudstream console"'},
            )
            await response(scope, receive, send)
            return
        if scope["method"] == "POST" and not _same_origin(headers):
            # A browser sends Basic credentials (and the loopback's trust) with any site's form: only the
            # console's own pages may post.
            response = Response(
                "refused: a form from another site (Origin does not match Host); nothing written", status_code=403
            )
            await response(scope, receive, send)
            return
        scope["user"] = user
        await self.app(scope, receive, send)


def _same_origin(headers: dict[bytes, bytes]) -> bool:
    """True unless the request names an Origin (browsers do on every POST) other than the Host it was sent to."""
    origin = headers.get(b"origin")
    if origin is None:
        return True  # not a browser's cross-site form (command-line clients send none)
    host = headers.get(b"host", b"").decode("latin-1")
    return origin.decode("latin-1").split("://", 1)[-1] == host
