"""Keystone v3 under /identity: version documents and password / application-credential tokens."""

from __future__ import annotations

import secrets
from typing import Any

from aiohttp import web

from worker.sandbox.context import endpoints_of, state_of
from worker.sandbox.errors import keystone_error
from worker.sandbox.faults import read_json
from worker.sandbox.state import CloudState, Project, Token, User, keystone_time, new_id

UNAUTHORIZED = "The request you have made requires authentication."
ROLES = ("admin", "member", "manager", "reader")
DOMAIN = {"id": "default", "name": "Default"}
# Role ids are stable for the life of the process, as in a bootstrapped Keystone.
ROLE_IDS = {name: new_id() for name in ROLES}


class AuthRejected(Exception):
    """Credentials or scope did not check out (Keystone answers 401)."""


def version_doc(auth_url: str) -> dict[str, Any]:
    return {
        "id": "v3.14",
        "status": "stable",
        "updated": "2020-04-07T00:00:00Z",
        "links": [{"rel": "self", "href": f"{auth_url}/"}],
        "media-types": [
            {"base": "application/json", "type": "application/vnd.openstack.identity-v3+json"}
        ],
    }


async def versions(request: web.Request) -> web.Response:
    doc = {"versions": {"values": [version_doc(endpoints_of(request).auth_url)]}}
    return web.json_response(doc, status=300)


async def version_v3(request: web.Request) -> web.Response:
    return web.json_response({"version": version_doc(endpoints_of(request).auth_url)})


def _domain_matches(ref: Any, domain_id: str) -> bool:
    if not isinstance(ref, dict):
        return False
    if "id" in ref:
        return bool(ref["id"] == domain_id)
    return str(ref.get("name", "")).lower() == DOMAIN["name"].lower() and domain_id == "default"


def _password_user(state: CloudState, ref: dict[str, Any]) -> User:
    user = state.user
    if "id" in ref:
        known = ref["id"] == user.id
    else:
        known = ref.get("name") == user.name and _domain_matches(ref.get("domain"), user.domain_id)
    if not known or not secrets.compare_digest(str(ref.get("password", "")), user.password):
        raise AuthRejected
    return user


def _scope_project(state: CloudState, scope: Any) -> Project | None:
    if scope is None:
        return None
    ref = scope.get("project") if isinstance(scope, dict) else None
    if not isinstance(ref, dict):
        raise AuthRejected
    project = state.project
    if "id" in ref:
        known = ref["id"] == project.id
    else:
        known = ref.get("name") == project.name and _domain_matches(
            ref.get("domain"), project.domain_id
        )
    if not known:
        raise AuthRejected
    return project


def _app_cred_token(state: CloudState, ref: dict[str, Any]) -> Token:
    cred = state.app_cred
    if "id" in ref:
        known = ref["id"] == cred.id
    else:
        user_ref = ref.get("user") or {}
        owner_ok = user_ref.get("id") == cred.user_id or (
            user_ref.get("name") == state.user.name
            and _domain_matches(user_ref.get("domain"), state.user.domain_id)
        )
        known = ref.get("name") == cred.name and owner_ok
    if not known or not secrets.compare_digest(str(ref.get("secret", "")), cred.secret):
        raise AuthRejected
    return state.issue_token(
        cred.user_id, cred.project_id, ("application_credential",), app_cred_id=cred.id
    )


def _authenticate(state: CloudState, auth: dict[str, Any]) -> Token:
    identity = auth["identity"]
    methods = identity["methods"]
    if "application_credential" in methods:
        if auth.get("scope") is not None:
            raise AuthRejected  # application credentials carry their own scope
        return _app_cred_token(state, identity["application_credential"])
    if "password" in methods:
        user = _password_user(state, identity["password"]["user"])
        project = _scope_project(state, auth.get("scope"))
        return state.issue_token(user.id, project.id if project else None, ("password",))
    raise AuthRejected


def token_body(state: CloudState, token: Token, auth_url: str, image_url: str) -> dict[str, Any]:
    user = state.user
    body: dict[str, Any] = {
        "methods": list(token.methods),
        "user": {"domain": DOMAIN, "id": user.id, "name": user.name, "password_expires_at": None},
        "audit_ids": [secrets.token_urlsafe(16)],
        "expires_at": keystone_time(token.expires_at),
        "issued_at": keystone_time(token.issued_at),
    }
    if token.project_id is None:
        return {"token": body}
    body["project"] = {"domain": DOMAIN, "id": state.project.id, "name": state.project.name}
    body["is_domain"] = False
    body["roles"] = [{"id": ROLE_IDS[name], "name": name} for name in ROLES]
    body["catalog"] = [
        _service("identity", "keystone", auth_url),
        _service("image", "glance", image_url),
    ]
    if token.application_credential_id:
        body["application_credential"] = {
            "id": state.app_cred.id,
            "name": state.app_cred.name,
            "restricted": True,
        }
    return {"token": body}


def _service(kind: str, name: str, url: str) -> dict[str, Any]:
    endpoints = [
        {
            "id": new_id(),
            "interface": interface,
            "region": "RegionOne",
            "region_id": "RegionOne",
            "url": url,
        }
        for interface in ("public", "internal", "admin")
    ]
    return {"endpoints": endpoints, "id": new_id(), "type": kind, "name": name}


async def issue_token(request: web.Request) -> web.Response:
    state = state_of(request)
    try:
        body = await read_json(request)
        token = _authenticate(state, body["auth"])
    except AuthRejected:
        uri = endpoints_of(request).auth_url
        return keystone_error(
            401, UNAUTHORIZED, headers={"WWW-Authenticate": f'Keystone uri="{uri}"'}
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        return keystone_error(
            400, "The request you have made is malformed: expecting auth.identity.methods."
        )
    urls = endpoints_of(request)
    return web.json_response(
        token_body(state, token, urls.auth_url, urls.image_url),
        status=201,
        headers={"X-Subject-Token": token.value},
    )


async def validate_token(request: web.Request) -> web.Response:
    state = state_of(request)
    if state.valid_token(request.headers.get("X-Auth-Token")) is None:
        return keystone_error(401, UNAUTHORIZED)
    subject = state.valid_token(request.headers.get("X-Subject-Token"))
    if subject is None:
        return keystone_error(404, "Could not find token.")
    urls = endpoints_of(request)
    return web.json_response(
        token_body(state, subject, urls.auth_url, urls.image_url),
        headers={"X-Subject-Token": subject.value},
    )


async def revoke_token(request: web.Request) -> web.Response:
    state = state_of(request)
    if state.valid_token(request.headers.get("X-Auth-Token")) is None:
        return keystone_error(401, UNAUTHORIZED)
    if state.tokens.pop(request.headers.get("X-Subject-Token", ""), None) is None:
        return keystone_error(404, "Could not find token.")
    return web.Response(status=204)


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_get("/identity", versions)
    router.add_get("/identity/", versions)
    router.add_get("/identity/v3", version_v3)
    router.add_get("/identity/v3/", version_v3)
    router.add_post("/identity/v3/auth/tokens", issue_token)
    router.add_get("/identity/v3/auth/tokens", validate_token)
    router.add_delete("/identity/v3/auth/tokens", revoke_token)
