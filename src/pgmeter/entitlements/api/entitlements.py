"""Entitlements and grants: OpenMeter's v1 subject routes and v2 customer routes.

``/api/v1/subjects/{subjectIdOrKey}/entitlements...`` (deprecated upstream, the
seeds' world: one subject per TPP) resolve the subject to its customer;
``/api/v2/customers/{customerIdOrKey}/entitlements...`` name the customer.
Both share the handlers below and differ where OpenMeter's do: v1 renders
``subjectKey``, a grant without an expiry as 100 years, takes v1 grant defaults
(nothing rolls over at a reset) and answers 404 for a missing value; v2 renders
the customer, paginates its lists, accepts ``issue`` and ``grants[]`` on create,
returns ``grantBalances`` and rolls a grant's balance over up to its amount.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from pgmeter.api.auth import namespace_of
from pgmeter.api.http import json_body, runtime_of, time_param
from pgmeter.api.problems import Problem, bad_request
from pgmeter.entitlements import balance, service, store
from pgmeter.entitlements.api import shapes
from pgmeter.entitlements.periods import IntervalError, ceil_minute, floor_minute, parse_interval
from pgmeter.entitlements.service import EntitlementInput, GrantInput
from pgmeter.meters.ulid import is_ulid
from pgmeter.query.params import QueryError, WindowSize, zone
from pgmeter.runtime import QuotaValues
from pgmeter.times import format_rfc3339

EXPIRATION_DURATIONS = ("HOUR", "DAY", "WEEK", "MONTH", "YEAR")
MAX_HISTORY_WINDOWS = 1000
HUNDRED_YEARS = timedelta(days=36525)


@dataclass(frozen=True)
class Api:
    """Which flavour a route speaks."""

    v2: bool
    subject: bool  # the v1 subject-scoped routes (404 for a missing value)


Handler = Callable[[Request], Awaitable[Response]]
V1 = Api(v2=False, subject=True)
V2 = Api(v2=True, subject=False)


def grace(request: Request) -> timedelta:
    return runtime_of(request).settings.valkey.settle_after


# -- resolving path parameters ---------------------------------------------------

async def customer_of_subject(request: Request) -> store.Customer:
    key = request.path_params["subjectIdOrKey"]
    namespace = namespace_of(request)
    async with runtime_of(request).api_pool.acquire() as conn:
        customer = await store.customer_by_subject(conn, namespace, key)
        if customer is not None:
            return customer
        known = await conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM subjects WHERE namespace = $1 AND (key = $2 OR id = $2)) "
            "OR EXISTS (SELECT 1 FROM customer_subjects WHERE namespace = $1 AND subject_key = $2)", namespace, key)
    if not known:
        raise Problem(404, f"subject not found: {key}")
    raise Problem(412, f"no customer found for subject {key}")


async def customer_of_path(request: Request, *, live: bool = False) -> store.Customer:
    key = request.path_params["customerIdOrKey"]
    async with runtime_of(request).api_pool.acquire() as conn:
        customer = await store.customer_by_id_or_key(conn, namespace_of(request), key)
    if customer is None:
        raise Problem(404, f"customer not found: {key}")
    if live and customer.deleted_at is not None:
        raise Problem(412, f"customer {customer.id} is deleted")
    return customer


async def owner(request: Request, api: Api, *, live: bool = False) -> store.Customer:
    return await customer_of_subject(request) if api.subject else await customer_of_path(request, live=live)


def not_found(request: Request, ref: str) -> Problem:
    return Problem(404, f"entitlement not found {ref} in namespace {namespace_of(request)}")


async def entitlement_by_id(request: Request, entitlement_id: str, *, deleted: bool = False) -> store.Entitlement:
    async with runtime_of(request).api_pool.acquire() as conn:
        ent = await store.entitlement_by_id(conn, namespace_of(request), entitlement_id)
    if ent is None or (ent.deleted_at is not None and not deleted):
        raise not_found(request, entitlement_id)
    return ent


async def entitlement_of(request: Request, customer: store.Customer, ref: str, at: datetime, *,
                         deleted: bool = False) -> store.Entitlement | None:
    """``{entitlementIdOrFeatureKey}``: an id first, else the feature key's entitlement active at ``at``."""
    namespace = namespace_of(request)
    async with runtime_of(request).api_pool.acquire() as conn:
        if is_ulid(ref):
            ent = await store.entitlement_by_id(conn, namespace, ref)
            if ent is not None and ent.customer_id == customer.id and (deleted or ent.deleted_at is None):
                return ent
        return await store.entitlement_for_feature_at(conn, namespace, customer.id, ref, at)


# -- rendering -------------------------------------------------------------------

def entitlement_json(ent: store.Entitlement, customer: store.Customer, api: Api,
                     resets: list[store.ResetRow] | None = None) -> dict[str, Any]:
    now = datetime.now(UTC)
    body: dict[str, Any] = {"type": ent.type, "id": ent.id, "featureId": ent.feature_id,
                            "featureKey": ent.feature_key}
    if api.v2:
        body["customerId"] = customer.id
        if customer.key is not None:
            body["customerKey"] = customer.key
    body["subjectKey"] = customer.subject_keys[0] if customer.subject_keys else ""
    if ent.metadata is not None:
        body["metadata"] = ent.metadata
    if ent.annotations is not None:
        body["annotations"] = ent.annotations
    body.update(shapes.times(activeFrom=ent.active_from, activeTo=ent.active_to, createdAt=ent.created_at,
                             updatedAt=ent.updated_at, deletedAt=ent.deleted_at))
    if ent.usage_interval is not None and ent.usage_anchor is not None:
        body["usagePeriod"] = shapes.period(ent.usage_interval, ent.usage_anchor)
        recurrence = ent.recurrence
        assert recurrence is not None
        if ent.type == "metered":
            timeline = balance.Timeline.of(ent, resets or [])
            lo, hi = timeline.period_at(now)
            body["currentUsagePeriod"] = {"from": format_rfc3339(lo), "to": format_rfc3339(hi)}
            body["lastReset"] = format_rfc3339(timeline.last_reset)
        else:
            lo, hi = recurrence.period_at(now)
            body["currentUsagePeriod"] = {"from": format_rfc3339(lo), "to": format_rfc3339(hi)}
    if ent.type == "metered":
        assert ent.measure_usage_from is not None
        body["measureUsageFrom"] = format_rfc3339(ent.measure_usage_from)
        body["isSoftLimit"] = ent.is_soft_limit
        body["isUnlimited"] = False
        if ent.issue_after_reset is not None:
            body["issueAfterReset"] = shapes.number(ent.issue_after_reset)
            if ent.issue_after_reset_priority is not None:
                body["issueAfterResetPriority"] = ent.issue_after_reset_priority
            if api.v2:
                body["issue"] = {"amount": shapes.number(ent.issue_after_reset),
                                 "priority": ent.issue_after_reset_priority or 1}
        body["preserveOverageAtReset"] = ent.preserve_overage_at_reset
    if ent.type == "static":
        body["config"] = ent.config
    return body


def grant_json(grant: store.GrantRow, api: Api) -> dict[str, Any]:
    now = datetime.now(UTC)
    body: dict[str, Any] = {"id": grant.id, "entitlementId": grant.entitlement_id,
                            "amount": shapes.number(grant.amount), "priority": grant.priority,
                            "effectiveAt": format_rfc3339(grant.effective_at)}
    if grant.expiration_duration is not None:
        body["expiration"] = {"duration": grant.expiration_duration, "count": grant.expiration_count}
        body["expiresAt"] = format_rfc3339(grant.expires_at) if grant.expires_at else None
    elif not api.v2:
        # v1's schema requires an expiration: OpenMeter shows 100 years from now.
        body["expiration"] = {"duration": "YEAR", "count": 100}
        body["expiresAt"] = format_rfc3339((now + HUNDRED_YEARS).replace(microsecond=0))
    body["maxRolloverAmount"] = shapes.number(grant.max_rollover)
    body["minRolloverAmount"] = shapes.number(grant.min_rollover)
    if grant.metadata is not None:
        body["metadata"] = grant.metadata
    if grant.annotations is not None:
        body["annotations"] = grant.annotations
    recurrence = grant.recurrence
    if recurrence is not None and grant.recurrence_interval is not None:
        body["recurrence"] = shapes.period(grant.recurrence_interval, recurrence.anchor)
        body["nextRecurrence"] = format_rfc3339(recurrence.next_at_or_after(now))
    body.update(shapes.times(voidedAt=grant.voided_at, createdAt=grant.created_at, updatedAt=grant.updated_at,
                             deletedAt=grant.deleted_at))
    return body


async def value_json(request: Request, ent: store.Entitlement | None, at: datetime, api: Api) -> dict[str, Any]:
    """OpenMeter's EntitlementValue for ``ent`` at ``at`` (``{hasAccess:false}`` when none or inactive)."""
    if ent is None or not ent.active_at(at):
        return {"hasAccess": False}
    if ent.type == "boolean":
        return {"hasAccess": True}
    if ent.type == "static":
        return {"hasAccess": True, "config": ent.config}
    value, _ = await balance.metered_value(runtime_of(request).api_pool, ent, at, grace=grace(request))
    body: dict[str, Any] = {"hasAccess": value.has_access, "balance": shapes.number(value.balance),
                            "usage": shapes.number(value.usage), "overage": shapes.number(value.overage),
                            "totalAvailableGrantAmount": shapes.number(value.total_available)}
    if api.v2:
        body["grantBalances"] = {k: shapes.number(v) for k, v in sorted(value.grant_balances.items())}
    return body


# -- reading request bodies ------------------------------------------------------

def _interval(value: Any, field: str) -> str:
    if not isinstance(value, str) or not value or len(value) > 64:
        raise shapes.field_error(field, "must be DAY, WEEK, MONTH, YEAR or an ISO-8601 duration")
    try:
        parsed = parse_interval(value)
    except IntervalError as exc:
        raise shapes.field_error(field, str(exc)) from None
    if not parsed.at_least_an_hour():
        raise shapes.field_error(field, "must be at least 1 hour")
    return value.upper() if value.upper() in ("DAY", "WEEK", "MONTH", "YEAR") else value


def grant_input(body: dict[str, Any], api: Api, prefix: str = "") -> GrantInput:
    amount = shapes.amount(body.get("amount"), prefix + "amount")
    assert amount is not None
    if amount == 0:
        raise Problem(400, "amount must be positive", extensions={"validationErrors": [
            {"code": "grant_amount_must_be_positive", "message": "amount must be positive",
             "field": prefix + "amount", "severity": "critical"}]})
    priority = shapes.integer(body.get("priority"), prefix + "priority", 1, 255)
    effective_at = shapes.timestamp(body, "effectiveAt", required=True)
    assert effective_at is not None
    expiration = shapes.obj(body, "expiration")
    duration = count = None
    if expiration is None:
        if not api.v2:
            raise shapes.field_error(prefix + "expiration", "is required")
    else:
        duration = expiration.get("duration")
        if duration not in EXPIRATION_DURATIONS:
            raise shapes.field_error(prefix + "expiration.duration", f"must be one of {', '.join(EXPIRATION_DURATIONS)}")
        count = shapes.integer(expiration.get("count"), prefix + "expiration.count", 1, 1000)
        if count is None:
            raise shapes.field_error(prefix + "expiration.count", "is required")
    default_min, default_max = (service.v2_grant_defaults if api.v2 else service.v1_grant_defaults)(amount)
    max_rollover = shapes.amount(body.get("maxRolloverAmount"), prefix + "maxRolloverAmount", required=False)
    min_rollover = shapes.amount(body.get("minRolloverAmount"), prefix + "minRolloverAmount", required=False)
    recurrence = shapes.obj(body, "recurrence")
    interval = anchor = None
    if recurrence is not None:
        interval = _interval(recurrence.get("interval"), prefix + "recurrence.interval")
        anchor = shapes.timestamp(recurrence, "anchor")
    return GrantInput(amount=amount, priority=priority or 0, effective_at=effective_at, expiration_duration=duration,
                      expiration_count=count,
                      min_rollover=default_min if min_rollover is None else min_rollover,
                      max_rollover=default_max if max_rollover is None else max_rollover,
                      recurrence_interval=interval, recurrence_anchor=anchor, metadata=shapes.metadata(body))


def entitlement_input(body: dict[str, Any], api: Api) -> EntitlementInput:
    kind = body.get("type")
    if kind not in ("metered", "boolean", "static"):
        raise shapes.field_error("type", "must be metered, boolean or static")
    feature_id = shapes.string(body, "featureId", max_len=shapes.MAX_KEY)
    feature_key = shapes.string(body, "featureKey", max_len=shapes.MAX_KEY)
    if feature_id is None and feature_key is None:
        raise shapes.field_error("featureKey", "feature id or key must be set")
    data = EntitlementInput(type=kind, feature_id=feature_id, feature_key=feature_key,
                            metadata=shapes.metadata(body))
    usage_period = shapes.obj(body, "usagePeriod")
    if usage_period is not None:
        data.usage_interval = _interval(usage_period.get("interval"), "usagePeriod.interval")
        data.usage_anchor = shapes.timestamp(usage_period, "anchor")
    if kind == "metered":
        measure = body.get("measureUsageFrom")
        if measure in ("CURRENT_PERIOD_START", "NOW"):
            data.measure_usage_from = measure
        elif measure is not None:
            data.measure_usage_from = shapes.bounded("measureUsageFrom", time_param("measureUsageFrom", measure))
        data.is_soft_limit = bool(shapes.boolean(body, "isSoftLimit"))
        data.issue_after_reset = shapes.amount(body.get("issueAfterReset"), "issueAfterReset", required=False)
        data.issue_after_reset_priority = shapes.integer(body.get("issueAfterResetPriority"),
                                                         "issueAfterResetPriority", 1, 255)
        data.preserve_overage_at_reset = bool(shapes.boolean(body, "preserveOverageAtReset"))
        if api.v2:
            issue = shapes.obj(body, "issue")
            if issue is not None:
                data.issue_after_reset = shapes.amount(issue.get("amount"), "issue.amount")
                data.issue_after_reset_priority = shapes.integer(issue.get("priority"), "issue.priority", 1, 255)
            grants = body.get("grants")
            if grants is not None:
                if not isinstance(grants, list) or len(grants) > 100 or not all(isinstance(g, dict) for g in grants):
                    raise shapes.field_error("grants", "must be a list of at most 100 grants")
                data.grants = [grant_input(g, api, f"grants[{i}].") for i, g in enumerate(grants)]
    if "config" in body and body["config"] is not None:
        config = body["config"]
        if not isinstance(config, str) or len(config) > 64 * 1024 or not shapes.storable(config):
            raise shapes.field_error("config", "must be a JSON string of at most 65536 characters")
        data.config = config
    return data


def values_now(request: Request) -> QuotaValues | None:
    """The quota room's Valkey-first reader when this request asks for a value now and it
    serves one; None to compute the value exactly.

    Found on the runtime (registered by pgmeter.roles), not imported: the quota room
    imports this room, which does not import it back.
    """
    runtime = runtime_of(request)
    values = runtime.quota_values
    if "time" in request.query_params or values is None or not values.enabled(runtime):
        return None
    return values


def at_param(request: Request, name: str = "time") -> datetime:
    value = shapes.query_time(request, name)
    return value if value is not None else datetime.now(UTC)


# -- handlers --------------------------------------------------------------------

def _routes(api: Api) -> list[Route]:
    base = "/api/v1/subjects/{subjectIdOrKey}/entitlements" if api.subject else \
        "/api/v2/customers/{customerIdOrKey}/entitlements"
    ref = "{entitlementId}" if not api.v2 else "{entitlementIdOrFeatureKey}"

    async def resolve(request: Request, customer: store.Customer, name: str, at: datetime) -> store.Entitlement:
        ref_value = request.path_params[name]
        if name == "entitlementId":  # v1: by id only, the subject in the path is ignored
            return await entitlement_by_id(request, ref_value)
        ent = await entitlement_of(request, customer, ref_value, at)
        if ent is None:
            raise not_found(request, ref_value)
        return ent

    async def create(request: Request) -> Response:
        customer = await owner(request, api, live=True)
        data = entitlement_input(await json_body(request), api)
        async with runtime_of(request).api_pool.acquire() as conn:
            ent = await service.create_entitlement(conn, namespace_of(request), customer, data)
        return JSONResponse(entitlement_json(ent, customer, api), status_code=201)

    async def list_(request: Request) -> Response:
        customer = await owner(request, api)
        include_deleted = shapes.flag(request, "includeDeleted")
        namespace = namespace_of(request)
        async with runtime_of(request).api_pool.acquire() as conn:
            if api.v2:
                page, size = shapes.pagination(request)
                total, ents = await store.list_entitlements(conn, namespace, customer_ids=[customer.id],
                                                            include_deleted=include_deleted, limit=size,
                                                            offset=(page - 1) * size)
                items = [entitlement_json(e, customer, api, await store.resets_of(conn, e.id)) for e in ents]
                return JSONResponse(shapes.page_body(total, page, size, items))
            _, ents = await store.list_entitlements(
                conn, namespace, customer_ids=[customer.id], include_deleted=include_deleted,
                active_at=None if include_deleted else datetime.now(UTC))
            return JSONResponse([entitlement_json(e, customer, api, await store.resets_of(conn, e.id)) for e in ents])

    async def get(request: Request) -> Response:
        customer = await owner(request, api)
        ent = await resolve(request, customer, ref.strip("{}"), datetime.now(UTC))
        async with runtime_of(request).api_pool.acquire() as conn:
            resets = await store.resets_of(conn, ent.id)
            if ent.customer_id != customer.id:
                found = await store.customer_by_id(conn, ent.namespace, ent.customer_id)
                assert found is not None
                customer = found
        return JSONResponse(entitlement_json(ent, customer, api, resets))

    async def delete(request: Request) -> Response:
        customer = await owner(request, api)
        ent = await resolve(request, customer, ref.strip("{}"), datetime.now(UTC))
        async with runtime_of(request).api_pool.acquire() as conn:
            await service.delete_entitlement(conn, ent)
        return Response(status_code=204)

    async def value(request: Request) -> Response:
        runtime = runtime_of(request)
        ref_value = request.path_params["entitlementIdOrFeatureKey"]
        values = values_now(request)
        now = values is not None
        if values is not None and not is_ulid(ref_value):
            # The quota room's copy in Valkey, without a Postgres round trip (pgmeter.quota.reader).
            key = values.key_for(runtime, namespace_of(request), feature_key=ref_value,
                                 subject=request.path_params.get("subjectIdOrKey"),
                                 customer=request.path_params.get("customerIdOrKey"))
            hit, now = await values.cached(runtime, key, v2=api.v2)
            if hit is not None:
                return JSONResponse(hit[0], headers=hit[1])
        elif values is not None:
            now = await values.worker_running(runtime)
        at = at_param(request)
        customer = await owner(request, api)
        ent = await entitlement_of(request, customer, ref_value, at, deleted=True)
        if ent is None and api.subject:
            raise not_found(request, ref_value)
        if values is not None and now and ent is not None and ent.type == "metered" and ent.active_at(at):
            found = await values.computed(runtime, ent.namespace, ent.id, v2=api.v2)
            if found is not None:
                return JSONResponse(found[0], headers=found[1])
        return JSONResponse(await value_json(request, ent, at, api))

    async def history(request: Request) -> Response:
        customer = await owner(request, api)
        ent = await resolve(request, customer, ref.strip("{}"), datetime.now(UTC))
        if ent.type != "metered":
            raise bad_request(f"expected entitlement type metered but got {ent.type}")
        size_text = shapes.single(request, "windowSize")
        if size_text is None:
            raise bad_request("windowSize is required", parameter="windowSize")
        try:
            size = WindowSize(size_text)
        except ValueError:
            raise bad_request("windowSize must be MINUTE, HOUR, DAY or MONTH", parameter="windowSize") from None
        zone_name = shapes.single(request, "windowTimeZone") or "UTC"
        try:
            tz = zone(zone_name)
        except QueryError as exc:
            raise bad_request(str(exc), parameter="windowTimeZone") from None
        async with runtime_of(request).api_pool.acquire() as conn:
            resets = await store.resets_of(conn, ent.id)
        lo = shapes.query_time(request, "from") or balance.Timeline.of(ent, resets).last_reset
        hi = shapes.query_time(request, "to") or datetime.now(UTC)
        assert ent.measure_usage_from is not None
        if lo < ent.measure_usage_from:
            raise bad_request(f"from {format_rfc3339(lo)} cannot be before {format_rfc3339(ent.measure_usage_from)}",
                              parameter="from")
        lo, hi = floor_minute(lo), ceil_minute(hi)
        if lo >= hi:
            raise bad_request("from must be before to", parameter="from")
        if len(balance.windows(lo, hi, size, tz)) > MAX_HISTORY_WINDOWS:
            raise bad_request(f"at most {MAX_HISTORY_WINDOWS} windows: use a larger windowSize or a shorter range",
                              parameter="windowSize")
        result = await balance.history(runtime_of(request).api_pool, ent, lo, hi, size, zone_name, tz,
                                       grace=grace(request))
        active = result.grants

        def visible(balances: dict[str, Decimal], at: datetime) -> dict[str, Decimal]:
            return {g.id: balances.get(g.id, Decimal(0)) for g in active if g.active_at(at)}

        def numbers(balances: dict[str, Decimal]) -> dict[str, int | float]:
            return {k: shapes.number(v) for k, v in balances.items()}

        return JSONResponse({
            "windowedHistory": [{"period": {"from": format_rfc3339(a.astimezone(tz)), "to": format_rfc3339(b.astimezone(tz))},
                                 "usage": shapes.number(u), "balanceAtStart": shapes.number(bal)}
                                for a, b, u, bal in result.windows],
            "burndownHistory": [{
                "period": {"from": format_rfc3339(s.start), "to": format_rfc3339(s.end)},
                "usage": shapes.number(s.usage), "overage": shapes.number(s.overage),
                "balanceAtStart": shapes.number(sum(visible(s.balances_at_start, s.start).values(), Decimal(0))),
                "grantBalancesAtStart": numbers(visible(s.balances_at_start, s.start)),
                "balanceAtEnd": shapes.number(sum(visible(s.balances_at_end, s.start).values(), Decimal(0))),
                "grantBalancesAtEnd": numbers(visible(s.balances_at_end, s.start)),
                "grantUsages": [{"grantId": k, "usage": shapes.number(v)} for k, v in s.grant_usages.items()],
            } for s in result.segments],
        })

    async def reset(request: Request) -> Response:
        customer = await owner(request, api)
        ent = await resolve(request, customer, ref.strip("{}"), datetime.now(UTC))
        body = await json_body(request, empty={})
        at = shapes.timestamp(body, "effectiveAt")
        retain = bool(shapes.boolean(body, "retainAnchor"))
        preserve = shapes.boolean(body, "preserveOverage", default=None)
        async with runtime_of(request).api_pool.acquire() as conn:
            await service.reset(conn, ent, at, retain, preserve)
        return Response(status_code=204)

    async def override(request: Request) -> Response:
        customer = await owner(request, api, live=True)
        ref_value = request.path_params["entitlementIdOrFeatureKey"]
        old = await entitlement_of(request, customer, ref_value, datetime.now(UTC), deleted=True)
        if old is None:
            raise not_found(request, ref_value)
        if old.deleted_at is not None:
            raise bad_request(f"entitlement already deleted: {old.id}")
        data = entitlement_input(await json_body(request), api)
        async with runtime_of(request).api_pool.acquire() as conn:
            ent = await service.create_entitlement(conn, namespace_of(request), customer, data, override=old)
        return JSONResponse(entitlement_json(ent, customer, api), status_code=201)

    async def create_grant(request: Request) -> Response:
        customer = await owner(request, api)
        ent = await entitlement_of(request, customer, request.path_params["entitlementIdOrFeatureKey"],
                                   datetime.now(UTC))
        if ent is None:
            raise not_found(request, request.path_params["entitlementIdOrFeatureKey"])
        data = grant_input(await json_body(request), api)
        async with runtime_of(request).api_pool.acquire() as conn:
            grant = await service.create_grant(conn, ent, data)
        return JSONResponse(grant_json(grant, api), status_code=201)

    async def list_grants(request: Request) -> Response:
        customer = await owner(request, api)
        ent = await entitlement_of(request, customer, request.path_params["entitlementIdOrFeatureKey"],
                                   datetime.now(UTC))
        if ent is None:
            raise not_found(request, request.path_params["entitlementIdOrFeatureKey"])
        include_deleted = shapes.flag(request, "includeDeleted")
        order_by = shapes.choice(request, "orderBy", ["id", "createdAt", "updatedAt"], "updatedAt")
        descending = shapes.choice(request, "order", ["ASC", "DESC"], "ASC") == "DESC"
        async with runtime_of(request).api_pool.acquire() as conn:
            grants = await store.grants_of(conn, ent.id, include_deleted=include_deleted, order_by=order_by,
                                           descending=descending)
        items = [grant_json(g, api) for g in grants]
        if api.v2:
            page, size = shapes.pagination(request)
            return JSONResponse(shapes.page_body(len(items), page, size, items[(page - 1) * size:page * size]))
        return JSONResponse(items)

    value_ref = "{entitlementIdOrFeatureKey}"
    return [
        Route(base, shapes.guarded(create), methods=["POST"]),
        Route(base, shapes.guarded(list_), methods=["GET"]),
        Route(f"{base}/{ref}", shapes.guarded(get), methods=["GET"]),
        Route(f"{base}/{ref}", shapes.guarded(delete), methods=["DELETE"]),
        Route(f"{base}/{value_ref}/value", shapes.guarded(value), methods=["GET"]),
        Route(f"{base}/{ref}/history", shapes.guarded(history), methods=["GET"]),
        Route(f"{base}/{ref}/reset", shapes.guarded(reset), methods=["POST"]),
        Route(f"{base}/{value_ref}/override", shapes.guarded(override), methods=["PUT"]),
        Route(f"{base}/{value_ref}/grants", shapes.guarded(create_grant), methods=["POST"]),
        Route(f"{base}/{value_ref}/grants", shapes.guarded(list_grants), methods=["GET"]),
    ]


# -- admin lists and grant void ----------------------------------------------------

def _list_param(request: Request, name: str) -> list[str]:
    return shapes.strings(request.query_params.getlist(name), name)


async def _customers_by_id(conn: Any, namespace: str, ids: set[str]) -> dict[str, store.Customer]:
    out = {}
    for customer_id in ids:
        customer = await store.customer_by_id(conn, namespace, customer_id)
        if customer is not None:
            out[customer_id] = customer
    return out


def _admin_entitlements(api: Api) -> Handler:
    async def handler(request: Request) -> Response:
        namespace = namespace_of(request)
        types = _list_param(request, "entitlementType")
        for kind in types:
            if kind not in ("metered", "boolean", "static"):
                raise bad_request("entitlementType must be metered, boolean or static", parameter="entitlementType")
        exclude_inactive = shapes.flag(request, "excludeInactive")
        order_by = shapes.choice(request, "orderBy", ["createdAt", "updatedAt"], "createdAt")
        descending = shapes.choice(request, "order", ["ASC", "DESC"], "ASC") == "DESC"
        paged = api.v2 or shapes.single(request, "page") is not None
        page, size = shapes.pagination(request)
        if not paged:
            size = shapes.positive(request, "limit", 1000, shapes.MAX_PAGE_SIZE)
            offset = shapes.offset(request)
        else:
            offset = (page - 1) * size
        async with runtime_of(request).api_pool.acquire() as conn:
            customer_ids = _list_param(request, "customerIds") if api.v2 else []
            customer_keys = _list_param(request, "customerKeys") if api.v2 else []
            if not api.v2:
                for subject in _list_param(request, "subject"):
                    found = await store.customer_by_subject(conn, namespace, subject)
                    customer_ids.append(found.id if found else "-")
            total, ents = await store.list_entitlements(
                conn, namespace, customer_ids=customer_ids or None, customer_keys=customer_keys or None,
                features=_list_param(request, "feature") or None, types=types or None,
                active_at=datetime.now(UTC) if exclude_inactive else None, order_by=order_by,
                descending=descending, limit=size, offset=offset)
            customers = await _customers_by_id(conn, namespace, {e.customer_id for e in ents})
            items = [entitlement_json(e, customers[e.customer_id], api, await store.resets_of(conn, e.id))
                     for e in ents]
        return JSONResponse(shapes.page_body(total, page, size, items) if paged else items)
    handler.__name__ = f"list_entitlements_{'v2' if api.v2 else 'v1'}"
    return handler


def _admin_get(api: Api) -> Handler:
    async def handler(request: Request) -> Response:
        ent = await entitlement_by_id(request, request.path_params["entitlementId"])
        async with runtime_of(request).api_pool.acquire() as conn:
            customer = await store.customer_by_id(conn, ent.namespace, ent.customer_id)
            resets = await store.resets_of(conn, ent.id)
        assert customer is not None
        return JSONResponse(entitlement_json(ent, customer, api, resets))
    handler.__name__ = f"get_entitlement_{'v2' if api.v2 else 'v1'}"
    return handler


def _admin_grants(api: Api) -> Handler:
    async def handler(request: Request) -> Response:
        namespace = namespace_of(request)
        include_deleted = shapes.flag(request, "includeDeleted")
        order_by = shapes.choice(request, "orderBy", ["id", "createdAt", "updatedAt"], "updatedAt")
        descending = shapes.choice(request, "order", ["ASC", "DESC"], "ASC") == "DESC"
        paged = api.v2 or shapes.single(request, "page") is not None
        page, size = shapes.pagination(request)
        if not paged:
            size = shapes.positive(request, "limit", 1000, shapes.MAX_PAGE_SIZE)
        async with runtime_of(request).api_pool.acquire() as conn:
            customer_ids: list[str] = []
            for subject in ([] if api.v2 else _list_param(request, "subject")):
                found = await store.customer_by_subject(conn, namespace, subject)
                customer_ids.append(found.id if found else "-")
            for ref in (_list_param(request, "customer") if api.v2 else []):
                found = await store.customer_by_id_or_key(conn, namespace, ref)
                customer_ids.append(found.id if found else "-")
            total, grants = await store.list_grants(
                conn, namespace, customer_ids=customer_ids or None, features=_list_param(request, "feature") or None,
                include_deleted=include_deleted, order_by=order_by, descending=descending, limit=size,
                offset=(page - 1) * size if paged else 0)
        items = [grant_json(g, api) for g in grants]
        return JSONResponse(shapes.page_body(total, page, size, items) if paged else items)
    handler.__name__ = f"list_grants_{'v2' if api.v2 else 'v1'}"
    return handler


async def void_grant(request: Request) -> Response:
    grant_id = request.path_params["grantId"]
    at = shapes.query_time(request, "at")
    async with runtime_of(request).api_pool.acquire() as conn:
        grant = await store.grant_by_id(conn, namespace_of(request), grant_id)
        if grant is None:
            raise Problem(404, f"grant not found: {grant_id}")
        await service.void_grant(conn, grant, at)
    return Response(status_code=204)


V1_ADMIN = Api(v2=False, subject=False)

routes = [
    *_routes(V1),
    *_routes(V2),
    Route("/api/v1/entitlements", shapes.guarded(_admin_entitlements(V1_ADMIN)), methods=["GET"]),
    Route("/api/v1/entitlements/{entitlementId}", shapes.guarded(_admin_get(V1_ADMIN)), methods=["GET"]),
    Route("/api/v2/entitlements", shapes.guarded(_admin_entitlements(V2)), methods=["GET"]),
    Route("/api/v2/entitlements/{entitlementId}", shapes.guarded(_admin_get(V2)), methods=["GET"]),
    Route("/api/v1/grants", shapes.guarded(_admin_grants(V1_ADMIN)), methods=["GET"]),
    Route("/api/v2/grants", shapes.guarded(_admin_grants(V2)), methods=["GET"]),
    Route("/api/v1/grants/{grantId}", shapes.guarded(void_grant), methods=["DELETE"]),
]
