"""The codec server: lets the Temporal web UI and CLI show encrypted payloads to operators
who may see them (payload_codec.py encrypts every payload Leadflow gives Temporal).

Temporal's codec server protocol: `POST .../encode` and `POST .../decode`, each taking and
answering `{"payloads": [...]}` (the Payloads protobuf as JSON); only the last part of the
path counts, so `/codec/decode` and `/codec/{namespace}/decode` both work. The browser
calls it from the UI's origin, so it answers CORS (preflight included) for the origins in
LEADFLOW_CODEC_ORIGINS, with credentials.

Who may: an API key of a manager (decoding shows personal data; encoding is offered to the
same people), as `Authorization: Bearer KEY` / `X-API-Key: KEY` (the Temporal CLI:
`--codec-auth "Bearer KEY"`), or a session cookie for the browser: open `/codec/login`
once, give the key, then turn on "Include cross-origin credentials" in the UI's codec
settings. No key: 401; another role: 403.

A payload that cannot be decoded here (its lead's key was destroyed by an erasure, or a
key no longer configured) is answered as it came: the UI shows it still encrypted, and the
rest of the history decoded.
"""

from __future__ import annotations

import html
import json
from typing import Awaitable, Callable
from urllib.parse import parse_qs

from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.routing import APIRoute
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from temporalio.api.common.v1 import Payloads

from payload_codec import EncryptionCodec, KeyUnavailable

COOKIE = "leadflow_codec"
COOKIE_MAX_AGE = 8 * 3600  # a working day
CODEC_ROLES = frozenset({"manager"})
PREFLIGHT_MAX_AGE = "600"
ALLOWED_HEADERS = "Authorization, Content-Type, X-Namespace, X-API-Key"


def _origin_allowed(request: Request) -> str | None:
    origin = request.headers.get("origin")
    allowed = request.app.state.backends.settings.codec_origins
    return origin if origin and origin in allowed else None


def _with_cors(request: Request, response: Response) -> Response:
    origin = _origin_allowed(request)
    if origin:
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Allow-Credentials"] = "true"
        response.headers["Vary"] = "Origin"
    return response


class _CorsRoute(APIRoute):
    """Every answer of the codec routes carries the CORS headers, refusals (401/403) too:
    without them the browser hides why it failed."""

    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        handler = super().get_route_handler()

        async def with_cors(request: Request) -> Response:
            try:
                response = await handler(request)
            except HTTPException as err:
                response = JSONResponse({"detail": err.detail}, status_code=err.status_code, headers=err.headers)
            return _with_cors(request, response)

        return with_cors


def _problem(description: str) -> dict:
    """A documented error answer ({"detail": ...}), as api.schemas.Problem (not imported: api imports this)."""
    return {"description": description, "content": {"application/json": {"schema": {
        "type": "object", "required": ["detail"], "properties": {"detail": {"type": "string"}}}}}}


router = APIRouter(prefix="/codec", tags=["codec server (Temporal UI)"], route_class=_CorsRoute)


def _principal(request: Request, key: str | None = None):
    """The caller by API key (header, or the session cookie); 401 without one, 403 unless manager."""
    if key is None:
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            key = auth[7:].strip()
        key = key or request.headers.get("x-api-key") or request.cookies.get(COOKIE)
    if not key:
        raise HTTPException(401, "missing API key: Authorization: Bearer <key>, X-API-Key, or log in at /codec/login",
                            headers={"WWW-Authenticate": "Bearer"})
    principal = request.app.state.keys.lookup(key)
    if principal is None:
        raise HTTPException(401, "invalid API key", headers={"WWW-Authenticate": "Bearer"})
    if principal.role.value not in CODEC_ROLES:
        raise HTTPException(403, f"role {principal.role.value} may not use the codec server; allowed: manager")
    return principal


async def _codec(request: Request) -> EncryptionCodec:
    temporal = await request.app.state.backends.temporal()  # its data converter: config.data_converter
    codec = temporal.data_converter.payload_codec
    if not isinstance(codec, EncryptionCodec):
        raise HTTPException(503, "this API's Temporal client has no payload codec")
    return codec


async def _payloads(request: Request) -> Payloads:
    """The body as the codec server protocol has it: {"payloads": [...]} (protobuf JSON)."""
    expected = 'expected {"payloads": [...]} (Payloads as protobuf JSON)'
    try:
        parsed = json.loads(await request.body() or b"null")
    except (ValueError, UnicodeDecodeError) as err:
        raise HTTPException(400, f"{expected}: {err}") from None
    if not isinstance(parsed, dict) or not isinstance(parsed.get("payloads"), list):
        raise HTTPException(400, expected)
    if not all(isinstance(item, dict) for item in parsed["payloads"]):  # protobuf's parser takes [] for one
        raise HTTPException(400, f"{expected}: each payload is an object")
    try:
        return json_format.ParseDict(parsed, Payloads())
    except (json_format.ParseError, DecodeError) as err:
        raise HTTPException(400, f"{expected}: {err}") from None


def _answer(payloads) -> Response:
    return Response(json_format.MessageToJson(Payloads(payloads=payloads)), media_type="application/json")


_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "required": ["payloads"], "additionalProperties": False,
    "properties": {"payloads": {"type": "array", "items": {"type": "object", "additionalProperties": False, "properties": {
        # protobuf JSON: null is the field's default
        "metadata": {"type": ["object", "null"], "additionalProperties": {"type": "string", "format": "byte"}},
        "data": {"type": ["string", "null"], "format": "byte"}}}}}}}}}}


_CODEC_ERRORS = {400: _problem("not Payloads as protobuf JSON"), 401: _problem("no or invalid API key or session"),
                 403: _problem("not a manager's key"), 429: _problem("too many failed authentications"),
                 503: _problem("Temporal cannot be reached, or a lead's key store")}


@router.post("/decode", summary="Decode payloads (Temporal codec server protocol)", openapi_extra=_BODY,
             responses=_CODEC_ERRORS,
             description="Payloads as protobuf JSON in, decrypted payloads out; one that cannot be decrypted "
                         "(its lead's key destroyed by an erasure) comes back as it was. Role: manager.")
@router.post("/{namespace}/decode", include_in_schema=False)
async def decode(request: Request) -> Response:
    _principal(request)
    codec, payloads = await _codec(request), await _payloads(request)
    decoded = []
    for payload in payloads.payloads:
        try:
            decoded.extend(await codec.decode([payload]))
        except KeyUnavailable:
            decoded.append(payload)
    return _answer(decoded)


@router.post("/encode", summary="Encode payloads (Temporal codec server protocol)", openapi_extra=_BODY,
             responses=_CODEC_ERRORS,
             description="Payloads as protobuf JSON in, encrypted with the current payload key out. Role: manager.")
@router.post("/{namespace}/encode", include_in_schema=False)
async def encode(request: Request) -> Response:
    _principal(request)
    codec, payloads = await _codec(request), await _payloads(request)
    return _answer(await codec.encode(list(payloads.payloads)))


@router.options("/{path:path}", include_in_schema=False)
async def preflight(request: Request, path: str) -> Response:
    """CORS preflight of the browser: which origin, methods and headers may call."""
    response = Response(status_code=204 if _origin_allowed(request) else 403)
    if _origin_allowed(request):
        response.headers["Access-Control-Allow-Methods"] = "POST, OPTIONS"
        response.headers["Access-Control-Allow-Headers"] = ALLOWED_HEADERS
        response.headers["Access-Control-Max-Age"] = PREFLIGHT_MAX_AGE
    return response


_LOGIN_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>Leadflow codec server</title></head>
<body style="font-family: sans-serif; max-width: 40em; margin: 3em auto">
<h1>Leadflow codec server</h1><p>{message}</p>
<form method="post" action="login"><label>Manager API key <input type="password" name="key" autofocus></label>
<button type="submit">Log in</button></form>
<p>Then, in the Temporal UI's codec server settings, turn on <em>Include cross-origin credentials</em>.</p>
</body></html>"""


@router.get("/login", response_class=HTMLResponse, summary="Log the browser in (a session cookie for the UI)")
async def login_page(request: Request) -> HTMLResponse:
    return HTMLResponse(_LOGIN_PAGE.format(message="Give a manager's API key to let this browser's Temporal UI "
                                                   "decode payloads."))


@router.post("/login", response_class=HTMLResponse, summary="The sign-in form's answer (a session cookie)",
             description="Form field `key`: a manager's API key. Sets an HttpOnly cookie for /codec.",
             openapi_extra={"requestBody": {"required": True, "content": {"application/x-www-form-urlencoded": {
                 "schema": {"type": "object", "required": ["key"],
                            "properties": {"key": {"type": "string", "minLength": 1, "pattern": r"\S"}}}}}}},
             responses={400: _problem("no key in the form"), 401: _problem("not a valid key"),
                        403: _problem("not a manager's key"), 429: _problem("too many failed authentications")})
async def login(request: Request) -> Response:
    form = {name: values[-1] for name, values in parse_qs((await request.body()).decode("utf-8", "replace")).items()}
    key = form.get("key", "").strip()
    if not key:
        raise HTTPException(400, "give a manager's API key in the form field `key`")
    principal = _principal(request, key=key)
    response = HTMLResponse(_LOGIN_PAGE.format(
        message=f"Logged in as {html.escape(principal.name)} for {COOKIE_MAX_AGE // 3600} hours."))
    response.set_cookie(COOKIE, key, max_age=COOKIE_MAX_AGE, path="/codec", httponly=True,
                        samesite="strict", secure=request.url.scheme == "https")
    return response


@router.post("/logout", include_in_schema=False)
async def logout(request: Request) -> Response:
    response = Response(status_code=204)
    response.delete_cookie(COOKIE, path="/codec")
    return response
