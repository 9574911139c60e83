"""`dtrag flags ...` and `dtrag rollout ...`: operator commands over the admin HTTP API.

They talk to the running service with an admin key, like any other client, so they work the
same against a laptop cluster and a remote one.
"""

from __future__ import annotations

import argparse
from typing import Any

import httpx

from cluster.settings import FEATURE_FLAGS


class OperationFailed(RuntimeError):
    """The service refused or could not carry out the request; the message is its answer."""


def _request(url: str, api_key: str, method: str, path: str, body: dict | None = None) -> dict[str, Any]:
    try:
        response = httpx.request(method, url + path, json=body, headers={"X-API-Key": api_key}, timeout=30)
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
        if name not in FEATURE_FLAGS:
            raise ValueError(f"unknown flag '{name}'; flags: {', '.join(FEATURE_FLAGS)}")
        flags[name] = value.lower() == "on"
    return flags


def format_flags(answer: dict[str, Any]) -> str:
    arms = answer["arms"]
    lines = [f"{'flag':<22} {'control':<8} {'treatment':<10} behaviour"]
    for flag in FEATURE_FLAGS:
        on = {arm: "on" if arms[arm].get(flag) else "off" for arm in ("control", "treatment")}
        behaviour = answer.get("behaviour", {}).get(flag, "")
        lines.append(f"{flag:<22} {on['control']:<8} {on['treatment']:<10} {behaviour}")
    return "\n".join(lines)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def format_status(status: dict[str, Any]) -> str:
    weight = status["treatment_weight"]
    lines = [
        f"stage {status['stage']} ({' -> '.join(status['stages'])}); "
        f"treatment {weight:.0%}, control {1 - weight:.0%}; config version {status['version']}",
    ]
    if status.get("rolled_back") and weight == 0.0:
        lines.append(f"rolled back: {status['rolled_back']}")
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


def run_flags(args: argparse.Namespace, url: str, api_key: str) -> str:
    if args.flags_command == "show":
        return format_flags(_request(url, api_key, "GET", "/api/v1/admin/flags"))
    flags = parse_assignments(args.assignments)
    _request(url, api_key, "PUT", "/api/v1/admin/flags", {"arm": args.arm, "flags": flags})
    return format_flags(_request(url, api_key, "GET", "/api/v1/admin/flags"))


def run_rollout(args: argparse.Namespace, url: str, api_key: str) -> str:
    action = args.rollout_command
    if action == "status":
        status = _request(url, api_key, "GET", "/api/v1/admin/rollout")
    elif action == "advance":
        status = _request(url, api_key, "POST", "/api/v1/admin/rollout/advance")
    elif action == "rollback":
        status = _request(url, api_key, "POST", "/api/v1/admin/rollout/rollback", {"reason": args.reason})
    else:
        status = _request(url, api_key, "PUT", "/api/v1/admin/rollout/weight", {"treatment_weight": args.weight})
    return format_status(status)


def add_commands(commands: argparse._SubParsersAction, add_service_options, handler) -> None:
    """Register `flags` and `rollout`; `add_service_options` adds --url and --api-key."""
    flags = commands.add_parser("flags", help="show or set feature flags per arm (live, no restart)")
    flag_commands = flags.add_subparsers(dest="flags_command", required=True)
    add_service_options(flag_commands.add_parser("show", help="flags of each arm and what they do"))
    set_flags = flag_commands.add_parser("set", help="e.g. dtrag flags set soft_q_bandit=on --arm treatment")
    set_flags.add_argument("assignments", nargs="+", metavar="NAME=on|off")
    set_flags.add_argument("--arm", choices=("control", "treatment"), default="treatment")
    add_service_options(set_flags)
    flags.set_defaults(handler=handler, operation=run_flags)

    rollout = commands.add_parser("rollout", help="progressive rollout of the treatment arm")
    rollout_commands = rollout.add_subparsers(dest="rollout_command", required=True)
    add_service_options(rollout_commands.add_parser("status", help="stage, weights, per-arm gates"))
    add_service_options(rollout_commands.add_parser("advance", help="move to the next stage"))
    rollback = rollout_commands.add_parser("rollback", help="treatment to 0% now")
    rollback.add_argument("--reason", default="rolled back by operator")
    add_service_options(rollback)
    weight = rollout_commands.add_parser("set-weight", help="set the treatment's share (0..1)")
    weight.add_argument("weight", type=float)
    add_service_options(weight)
    rollout.set_defaults(handler=handler, operation=run_rollout)
