"""Operator requests over the admin HTTP API (`dtrag flags|rollout|policy ...`), and their reports.

They talk to the running service with an admin key, like any other client, so they work the
same against a laptop cluster and a remote one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from cluster.core.vocabulary import ARMS, Flag, parse_flag


class OperationFailed(RuntimeError):
    """The service refused or could not carry out the request; the message is its answer."""


def _request(url: str, api_key: str, method: str, path: str, body: dict | None = None, *,
             content: bytes | None = None, params: dict[str, Any] | None = None, timeout_s: float = 30) -> Any:
    headers = {"X-API-Key": api_key}
    if content is not None:
        headers["Content-Type"] = "application/octet-stream"
    try:
        response = httpx.request(method, url + path, json=body, content=content, params=params, headers=headers,
                                 timeout=timeout_s)
    except httpx.HTTPError as error:
        raise OperationFailed(f"cannot reach the service at {url}: {error}; is `dtrag up` running?") from error
    if response.status_code != 200:
        try:
            message = response.json().get("message", response.text)
        except ValueError:
            message = response.text
        raise OperationFailed(f"HTTP {response.status_code}: {message}")
    return response.json()


def parse_assignments(items: list[str]) -> dict[str, bool]:
    """`["soft_q_bandit=on", ...]` -> `{"soft_q_bandit": True}`; errors name the bad item."""
    flags = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or value.lower() not in ("on", "off"):
            raise ValueError(f"'{item}': expected NAME=on or NAME=off")
        flags[parse_flag(name).value] = value.lower() == "on"
    return flags


def format_flags(answer: dict[str, Any]) -> str:
    arms = answer["arms"]
    lines = [f"{'flag':<22} {'control':<8} {'treatment':<10} behaviour"]
    for flag in Flag:
        on = {arm: "on" if arms[arm].get(flag) else "off" for arm in ARMS}
        behaviour = answer.get("behaviour", {}).get(flag, "")
        lines.append(f"{flag:<22} {on['control']:<8} {on['treatment']:<10} {behaviour}")
    return "\n".join(lines)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _store_and_replicas(status: dict[str, Any]) -> str:
    """Whether the state is stored yet, and how many replicas serve this version."""
    store, replicas = status["store"], status["replicas"]
    if not store["loaded"]:
        stored = "defaults (the stored state is not loaded yet: the database is not answering)"
    elif store["saved"]:
        stored = "saved"
    else:
        stored = "not saved yet (retrying in the background until the database answers)"
    current = sum(1 for version in replicas.values() if version == status["version"])
    return f"state {stored}; {current} of {len(replicas)} replicas on version {status['version']}"


def format_status(status: dict[str, Any]) -> str:
    weight = status["treatment_weight"]
    lines = [
        f"stage {status['stage']} ({' -> '.join(status['stages'])}); "
        f"treatment {weight:.0%}, control {1 - weight:.0%}; config version {status['version']}",
    ]
    if status.get("rolled_back") and weight == 0.0:
        lines.append(f"rolled back: {status['rolled_back']}")
    lines.append(_store_and_replicas(status))
    lines.append(f"{'arm':<10} {'requests':>8} {'errors':>7} {'p50 ms':>8} {'p95 ms':>8} "
                 f"{'rewards':>7} {'mean reward (95% CI)':>24}")
    for arm, s in status["arms"].items():
        reward = "-"
        if s["mean_reward"] is not None:
            ci = s["reward_ci95"]
            reward = f"{s['mean_reward']:.3f}" + (f" ({ci[0]:.3f}..{ci[1]:.3f})" if ci else "")
        lines.append(f"{arm:<10} {s['requests']:>8} {s['error_rate']:>7.1%} {_ms(s['p50_ms']):>8} "
                     f"{_ms(s['p95_ms']):>8} {s['rewards']:>7} {reward:>24}")
    difference = status.get("reward_difference")
    if difference:
        verdict = "significant" if difference["significant"] else "not significant"
        lines.append(f"reward treatment - control: {difference['delta']:+.3f} "
                     f"(95% CI {difference['ci95'][0]:+.3f}..{difference['ci95'][1]:+.3f}, "
                     f"p={difference['p_value']:.3f}, {verdict})")
    guard = status["guard"]
    lines.append(f"guard: {guard['consecutive_failures']}/{guard['failures_to_rollback']} failed checks"
                 + (f" ({'; '.join(guard['last_failures'])})" if guard["last_failures"] else ""))
    for event in status["events"][-5:]:
        lines.append(f"  event: {event['event']}")
    return "\n".join(lines)


def show_flags(url: str, api_key: str) -> str:
    return format_flags(_request(url, api_key, "GET", "/api/v1/admin/flags"))


def set_flags(url: str, api_key: str, arm: str, assignments: list[str]) -> str:
    flags = parse_assignments(assignments)
    _request(url, api_key, "PUT", "/api/v1/admin/flags", {"arm": arm, "flags": flags})
    return show_flags(url, api_key)


def rollout_status(url: str, api_key: str) -> str:
    return format_status(_request(url, api_key, "GET", "/api/v1/admin/rollout"))


def advance(url: str, api_key: str) -> str:
    return format_status(_request(url, api_key, "POST", "/api/v1/admin/rollout/advance"))


def rollback(url: str, api_key: str, reason: str) -> str:
    return format_status(_request(url, api_key, "POST", "/api/v1/admin/rollout/rollback", {"reason": reason}))


def set_weight(url: str, api_key: str, weight: float) -> str:
    return format_status(_request(url, api_key, "PUT", "/api/v1/admin/rollout/weight",
                                  {"treatment_weight": weight}))


def _estimate(estimate: dict[str, Any]) -> str:
    return f"{estimate['value']:+.4f} [{estimate['low']:+.4f}, {estimate['high']:+.4f}]"


def format_policy_change(change: dict[str, Any]) -> str:
    what = "promoted candidate" if change["change"] == "promote" else "rolled back the promotion of"
    lines = [f"{what} {change['candidate']!r}: policy version {change['policy_version']} "
             f"(was {change['previous_version']}){', forced' if change['forced'] else ''}"]
    judgement = change.get("judgement")
    if judgement:
        lines.append(f"judged on {judgement['rows']} logged searches (doubly robust, 95% interval): candidate "
                     f"{_estimate(judgement['candidate'])}, live {_estimate(judgement['live'])}, "
                     f"difference {_estimate(judgement['difference'])}, margin {judgement['margin']:g}")
    elif change["change"] == "promote":
        lines.append("not judged: too few logged searches")
    return "\n".join(lines)


def promote_policy(url: str, api_key: str, candidate: Path, force: bool) -> str:
    change = _request(url, api_key, "POST", "/api/v1/admin/policy/promote", content=candidate.read_bytes(),
                      params={"force": str(force).lower()}, timeout_s=120)
    return format_policy_change(change)


def rollback_policy(url: str, api_key: str) -> str:
    return format_policy_change(_request(url, api_key, "POST", "/api/v1/admin/policy/rollback", timeout_s=120))


def policy_history(url: str, api_key: str, limit: int) -> str:
    changes = _request(url, api_key, "GET", "/api/v1/admin/policy/history", params={"limit": limit})
    if not changes:
        return "no policy has been promoted"
    lines = [f"{'id':>4} {'when (UTC)':<19} {'change':<8} {'candidate':<24} {'version':>9} {'key':<10} "
             f"{'difference (95%)':<28} note"]
    for c in changes:
        judgement = c["judgement"]
        difference = _estimate(judgement["difference"]) if judgement else "not judged"
        note = ", ".join(n for n in ("forced" if c["forced"] else "",
                                     f"undone by {c['undone_by']}" if c["undone_by"] else "") if n)
        lines.append(f"{c['id']:>4} {c['at'][:19].replace('T', ' '):<19} {c['change']:<8} "
                     f"{(c['candidate'] or '-')[:24]:<24} {c['previous_version']:>4}>{c['policy_version']:<4} "
                     f"{c['key_id']:<10} {difference:<28} {note}")
    return "\n".join(lines)
