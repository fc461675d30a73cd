"""The OpenAPI 3.1 document of the HTTP gateway, generated from the services' own models.

Every service `group.function` is `POST /v1/group/function` (JSON body: its input model), and
`GET /v1/group/function?field=value` when every input field is a scalar. Answers are the
envelope, its `result` typed by the service's output model. Model schemas are pydantic's JSON
Schema (2020-12, which OpenAPI 3.1 takes as it is), hoisted into `components/schemas` under the
service's name so that two services' `In` models never collide.
"""
from __future__ import annotations

import copy
from typing import Any, Iterable

SCALAR_TYPES = {"string", "integer", "number", "boolean", "null"}

# HTTP status of each error code of the envelope (microcores.errors); anything else a service
# raises on purpose with a code of its own is a 422.
STATUS_OF_CODE: dict[str, int] = {
    "invalid_input": 400, "cycle": 400, "depth_exceeded": 400,
    "unauthenticated": 401, "forbidden": 403,
    "unknown_service": 404, "no_data": 404,
    "method_not_allowed": 405,
    "too_large": 413,
    "internal": 500, "service_error": 500, "error": 500,
    "bad_output": 502,
    "unavailable": 503, "overloaded": 503,
    "outcome_unknown": 502,
    "cancelled": 499,
    "deadline_exceeded": 504,
    "unknown_call": 404,
    "upstream_error": 502, "upstream_unavailable": 503,  # routes (route_calls.py); a source's 4xx: its own status
}


def http_status(code: str) -> int:
    return STATUS_OF_CODE.get(code, 422)


def _is_scalar(schema: dict[str, Any], defs: dict[str, Any]) -> bool:
    if "$ref" in schema:
        target = defs.get(schema["$ref"].rsplit("/", 1)[-1], {})
        return "enum" in target or _is_scalar(target, defs) if target else False
    if "enum" in schema or "const" in schema:
        return True
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return all(_is_scalar(s, defs) for s in schema[key])
    t = schema.get("type")
    if isinstance(t, list):
        return set(t) <= SCALAR_TYPES
    return t in SCALAR_TYPES


def scalar_fields(model: type) -> dict[str, dict[str, Any]] | None:
    """The input fields' schemas when every field is a scalar (GET with query parameters), else None."""
    schema = model.model_json_schema()  # type: ignore[attr-defined]
    defs = schema.get("$defs", {})
    props = schema.get("properties", {})
    if schema.get("type") != "object" or not all(_is_scalar(p, defs) for p in props.values()):
        return None
    return props


def _hoist(schema: dict[str, Any], prefix: str, components: dict[str, Any]) -> dict[str, Any]:
    """Move `$defs` into components (refs already point there) and return a ref to the model."""
    schema = copy.deepcopy(schema)
    for name, d in schema.pop("$defs", {}).items():
        components[f"{prefix}.{name}"] = d
    name = f"{prefix}.{schema.get('title', 'Model')}"
    components[name] = schema
    return {"$ref": f"#/components/schemas/{name}"}


ENVELOPE_FIELDS: dict[str, Any] = {
    "executed_by": {"type": "string", "description": "an agent id, `coordinator`, `cache`, or `upstream` (a route's "
                    "source)"},
    "attempts": {"type": "integer", "minimum": 0},
    "process_time_ms": {"type": "number", "description": "time the gateway spent on the call"},
    "cache_hit": {"type": "boolean"},
    "verified": {"type": "boolean", "description": "a second executor agreed with the result, or the "
                 "coordinator computed it (see the coordinator's --verify)"},
    "service": {"type": "string"},
    "version": {"type": "string"},
    "call_id": {"type": "string", "description": "the call's id (GET /v1/calls/{call_id} for submitted calls)"},
    "coordinator": {"type": "string", "description": "the coordinator of the cluster the call was sent on to, "
                    "whose agent ran it (none of this one's could); absent when this coordinator answered"},
}


def _common_components() -> dict[str, Any]:
    return {
        "Error": {"type": "object", "required": ["code", "message"], "properties": {
            "code": {"type": "string", "description": "stable, machine-readable: invalid_input, "
                                                      "unauthenticated, forbidden, unknown_service, no_data, ..."},
            "message": {"type": "string", "description": "for people: what was wrong and what to do"},
            "field": {"type": "string", "description": "the input field at fault, when there is one (for "
                                                       "bad_output, the output field)"},
            "details": {"type": "string", "description": "service_error only: the service's traceback within "
                        "its package (files relative to it, line numbers, functions, the exception); "
                        "nothing of the machine that ran it"}}},
        "ErrorEnvelope": {"type": "object", "required": ["status", "error", "executed_by", "attempts",
                                                         "process_time_ms", "cache_hit"],
                          "properties": {"status": {"const": "error"},
                                         "error": {"$ref": "#/components/schemas/Error"}, **ENVELOPE_FIELDS}},
        "TokenResponse": {"type": "object", "required": ["access_token", "token_type", "expires_in"],
                          "properties": {"access_token": {"type": "string"}, "token_type": {"const": "Bearer"},
                                         "expires_in": {"type": "number"}, "scope": {"type": "string"},
                                         "refresh_token": {"type": "string"}}},
        "OAuthError": {"type": "object", "required": ["error"], "properties": {
            "error": {"type": "string", "description": "RFC 6749 section 5.2: invalid_request, invalid_client, "
                                                       "invalid_grant, unsupported_grant_type, invalid_scope"},
            "error_description": {"type": "string"}}},
    }


def _error_responses(codes: Iterable[int]) -> dict[str, Any]:
    words = {400: "invalid input (nothing was dispatched)", 401: "missing, unknown, expired or revoked token",
             403: "the service is outside the token's scope", 404: "unknown service, or the service found no data",
             405: "GET on a service whose input is not all scalars: use POST",
             413: "input too large", 422: "the service refused the input with an error of its own",
             500: "the service failed", 502: "the service answered something that is not its output model",
             503: "no capacity, or the coordinator is stopping", 504: "the call ran past its deadline"}
    out: dict[str, Any] = {}
    for code in codes:
        r: dict[str, Any] = {"description": words[code], "content": {"application/json": {
            "schema": {"$ref": "#/components/schemas/ErrorEnvelope"}}}}
        if code in (401, 403):
            r["headers"] = {"WWW-Authenticate": {"schema": {"type": "string"},
                                                 "description": "RFC 6750: Bearer, with error= and error_description="}}
        out[str(code)] = r
    return out


def build(entries: Iterable[Any], *, title: str = "microswarm", version: str = "0") -> dict[str, Any]:
    """The OpenAPI document for the current registry entries (`.cls`, `.name`, `.version`)."""
    components = _common_components()
    paths: dict[str, Any] = {}
    scopes: dict[str, str] = {"*": "every service"}
    tags: dict[str, str] = {}
    errors = _error_responses([400, 401, 403, 404, 405, 413, 422, 500, 502, 503, 504])
    for e in entries:
        cls = e.cls
        group, function = e.name.split(".", 1)
        tags.setdefault(group, f"the {group} services")
        scopes[f"{group}.*"] = f"every {group} service"
        scopes[e.name] = f"{e.name} only"
        prefix = e.name
        ref_template = f"#/components/schemas/{prefix}.{{model}}"
        in_schema = cls.input_model.model_json_schema(ref_template=ref_template, mode="validation")
        if cls.input_model.model_config.get("extra") is None:  # unknown fields are refused (core.validate_model)
            in_schema.setdefault("additionalProperties", False)
        out_schema = cls.output_model.model_json_schema(ref_template=ref_template, mode="serialization")
        in_ref = _hoist(in_schema, prefix, components)
        out_ref = _hoist(out_schema, prefix, components)
        env_name = f"{prefix}.Envelope"
        components[env_name] = {
            "type": "object", "required": ["status", "result", "executed_by", "attempts", "process_time_ms",
                                           "cache_hit"],
            "properties": {"status": {"const": "ok"}, "result": out_ref, **ENVELOPE_FIELDS}}
        doc = (cls.__doc__ or "").strip()
        summary = doc.split("\n")[0] or e.name
        facts = [f"version {e.version}", f"timeout {float(cls.timeout):g} s"]
        if cls.pure:
            facts.append("pure (answers may come from the cache)")
        description = (doc + "\n\n" if doc else "") + ", ".join(facts) + "."
        ok = {"200": {"description": "the envelope with the service's result",
                      "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{env_name}"}}}}}
        security = [{"oauth2": [e.name]}, {"bearer": []}]
        op_id = f"{group}_{function}"
        item: dict[str, Any] = {"post": {
            "operationId": f"{op_id}_post", "tags": [group], "summary": summary, "description": description,
            "security": security,
            "parameters": [{"name": "async", "in": "query", "required": False, "schema": {"type": "string",
                            "enum": ["1", "true"]}, "description": "answer 202 with the call's id at once; "
                            "GET /v1/calls/{call_id} gives its envelope"}],
            "requestBody": {"required": True, "content": {"application/json": {"schema": in_ref}}},
            "responses": {**ok, "202": {"description": "with ?async=1: submitted; fetch /v1/calls/{call_id}"},
                          **errors}}}
        fields = scalar_fields(cls.input_model)
        if fields is not None:
            required = set(in_schema.get("required", []))
            params = []
            for name, schema in in_schema.get("properties", {}).items():
                p = {"name": name, "in": "query", "required": name in required, "schema": schema}
                if schema.get("description"):
                    p["description"] = schema["description"]
                params.append(p)
            item["get"] = {"operationId": f"{op_id}_get", "tags": [group], "summary": summary,
                           "description": description + " The same call with query parameters.",
                           "security": security, "parameters": params, "responses": {**ok, **errors}}
        paths[f"/v1/{group}/{function}"] = item

    from .gateway_calls import openapi_paths
    paths.update(openapi_paths())
    paths["/oauth/token"] = {"post": {
        "operationId": "oauth_token", "tags": ["oauth"], "summary": "Get an access token",
        "description": "OAuth 2.0 token endpoint. Authenticate with HTTP Basic (client id and secret; "
                       "client_id and client_secret in the form also work). `client_credentials` answers an "
                       "access token (Bearer, 3600 s) and a refresh token; `refresh_token` rotates it: a "
                       "refresh token used twice revokes every token of its family.",
        "security": [{"basic": []}],
        "requestBody": {"required": True, "content": {"application/x-www-form-urlencoded": {"schema": {
            "type": "object", "required": ["grant_type"], "properties": {
                "grant_type": {"type": "string", "enum": ["client_credentials", "refresh_token"]},
                "scope": {"type": "string", "description": "space-separated service patterns, within the "
                                                           "client's own"},
                "refresh_token": {"type": "string"},
                "client_id": {"type": "string"}, "client_secret": {"type": "string"}}}}}},
        "responses": {
            "200": {"description": "a token", "content": {"application/json": {
                "schema": {"$ref": "#/components/schemas/TokenResponse"}}}},
            "400": {"description": "bad request, grant or scope", "content": {"application/json": {
                "schema": {"$ref": "#/components/schemas/OAuthError"}}}},
            "401": {"description": "wrong client credentials", "headers": {"WWW-Authenticate": {
                "schema": {"type": "string"}}}, "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/OAuthError"}}}}}}}
    paths["/oauth/revoke"] = {"post": {
        "operationId": "oauth_revoke", "tags": ["oauth"], "summary": "Revoke a token (RFC 7009)",
        "description": "Ends one of the client's tokens; a refresh token takes its whole family with it. "
                       "Answers 200 whether or not the token was known.",
        "security": [{"basic": []}],
        "requestBody": {"required": True, "content": {"application/x-www-form-urlencoded": {"schema": {
            "type": "object", "required": ["token"], "properties": {
                "token": {"type": "string"},
                "token_type_hint": {"type": "string", "enum": ["access_token", "refresh_token"]},
                "client_id": {"type": "string"}, "client_secret": {"type": "string"}}}}}},
        "responses": {
            "200": {"description": "revoked, or unknown"},
            "400": {"description": "no token given", "content": {"application/json": {
                "schema": {"$ref": "#/components/schemas/OAuthError"}}}},
            "401": {"description": "wrong client credentials", "headers": {"WWW-Authenticate": {
                "schema": {"type": "string"}}}, "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/OAuthError"}}}}}}}
    paths["/healthz"] = {"get": {
        "operationId": "healthz", "tags": ["operations"], "summary": "Liveness of the gateway", "security": [],
        "responses": {"200": {"description": "serving", "content": {"application/json": {"schema": {
            "type": "object", "required": ["status"], "properties": {
                "status": {"const": "ok"}, "services": {"type": "integer"}, "agents": {"type": "integer"}}}}}}}}}

    return {
        "openapi": "3.1.0",
        "info": {"title": f"{title} services", "version": version,
                 "description": "Every microswarm service over HTTP and JSON. Authorize with your client "
                                "credentials (`microswarm clients create NAME`), then call "
                                "`/v1/{group}/{function}`. Every answer, success or error, is the same envelope: "
                                "status, result or error {code, message, field}, executed_by, attempts, "
                                "process_time_ms, cache_hit, service, version."},
        "tags": [{"name": g, "description": d} for g, d in sorted(tags.items())]
        + [{"name": "oauth", "description": "client credentials and tokens"}],
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "oauth2": {"type": "oauth2", "description": "client credentials; scopes are service patterns",
                           "flows": {"clientCredentials": {"tokenUrl": "/oauth/token", "refreshUrl": "/oauth/token",
                                                           "scopes": scopes}}},
                "bearer": {"type": "http", "scheme": "bearer", "description": "an access token from /oauth/token"},
                "basic": {"type": "http", "scheme": "basic", "description": "client id and client secret"},
            },
        },
    }
