"""`dtrag eval`, `train`, `flags`, `rollout`, `policy`: commands that talk to a running service over HTTP.

Each takes `--url` (default: the configured host and port) and `--api-key` (default:
DTRAG_API_KEY, else the demo key `dtrag up` stored).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cluster.cli.demo_key import stored_demo_key
from cluster.clients import operate
from cluster.core.vocabulary import ARMS, STRATEGIES, Arm
from cluster.platform.settings import Settings


def service_target(args: argparse.Namespace, settings: Settings) -> tuple[str, str]:
    """The running service's URL and an API key: flags, else DTRAG_API_KEY, else the demo key."""
    url = args.url or f"http://{settings.http.host}:{settings.http.port}"
    key = args.api_key or settings.client.api_key or stored_demo_key(settings)
    if not key:
        raise ValueError("no API key: pass --api-key or set DTRAG_API_KEY")
    return url, key


def add_target_options(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--url", help="service URL (default: the configured host and port)")
    parser.add_argument("--api-key", default=None, help="default: DTRAG_API_KEY or the demo key")
    return parser


def cmd_eval(args: argparse.Namespace, settings: Settings) -> int:
    from cluster.clients.evaluate import evaluate_dataset, format_table

    url, key = service_target(args, settings)
    results = evaluate_dataset(Path(args.dataset), url, key, args.strategy or list(STRATEGIES),
                               concurrency=args.concurrency, json_path=args.json)
    print(format_table(results))
    return 0


def cmd_train(args: argparse.Namespace, settings: Settings) -> int:
    from cluster.clients.train import TrainingError, train_dataset
    from cluster.clients.train_plot import plot_cost_quality
    from cluster.clients.train_report import format_report, report_json

    url, key = service_target(args, settings)
    dataset = Path(args.dataset)
    plot = args.plot or Path("bench/results") / f"cost_quality_{dataset.resolve().name}.png"
    try:
        report = train_dataset(dataset, url, key, seeds=list(range(args.seeds)), judged=args.judged,
                               concurrency=args.concurrency)
    except TrainingError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(format_report(report))
    if args.json:
        args.json.write_text(json.dumps(report_json(report), indent=1))
    plot_cost_quality(report, plot)
    print(f"\ncost and quality: {plot}")
    return 0


def cmd_flags(args: argparse.Namespace, settings: Settings) -> int:
    url, key = service_target(args, settings)
    if args.flags_command == "show":
        print(operate.show_flags(url, key))
    else:
        print(operate.set_flags(url, key, args.arm, args.assignments))
    return 0


def cmd_rollout(args: argparse.Namespace, settings: Settings) -> int:
    url, key = service_target(args, settings)
    action = args.rollout_command
    if action == "status":
        print(operate.rollout_status(url, key))
    elif action == "advance":
        print(operate.advance(url, key))
    elif action == "rollback":
        print(operate.rollback(url, key, args.reason))
    else:
        print(operate.set_weight(url, key, args.weight))
    return 0


def cmd_policy(args: argparse.Namespace, settings: Settings) -> int:
    url, key = service_target(args, settings)
    if args.policy_command == "promote":
        print(operate.promote_policy(url, key, args.candidate, args.force))
    elif args.policy_command == "rollback":
        print(operate.rollback_policy(url, key))
    else:
        print(operate.policy_history(url, key, args.limit))
    return 0


def add_parsers(commands: argparse._SubParsersAction) -> None:
    evaluate = add_target_options(
        commands.add_parser("eval", help="nDCG@10, P@5, R@100 of a BEIR dataset's test queries"))
    evaluate.add_argument("dataset", help="BEIR folder with queries.jsonl and qrels/test.tsv")
    evaluate.add_argument("--strategy", action="append", choices=STRATEGIES, help="default: all")
    evaluate.add_argument("--concurrency", type=int, default=4)
    evaluate.add_argument("--json", type=Path, help="also write per-query results here")
    evaluate.set_defaults(handler=cmd_eval)

    train = add_target_options(commands.add_parser(  # the key needs the search and admin scopes
        "train", help="reset and teach the policy with a simulated user on training queries, per seed; "
        "score it on test queries"))
    train.add_argument("dataset", help="BEIR folder; extra/queries_all.jsonl + extra/qrels_train.tsv "
                       "train when present, else half of the judged test queries")
    train.add_argument("--judged", type=int, default=1000,
                       help="judged queries per seed (passes over the training queries as needed)")
    train.add_argument("--seeds", type=int, default=5, help="runs from a fresh model, seeds 0..N-1")
    train.add_argument("--concurrency", type=int, default=4)
    train.add_argument("--plot", type=Path, help="cost-quality and learning-curve PNG "
                       "(default: bench/results/cost_quality_<dataset>.png)")
    train.add_argument("--json", type=Path, help="also write tables, checks, model snapshots, per-query results")
    train.set_defaults(handler=cmd_train)

    flags = commands.add_parser("flags", help="show or set feature flags per arm (live, no restart)")
    flag_commands = flags.add_subparsers(dest="flags_command", required=True)
    add_target_options(flag_commands.add_parser("show", help="flags of each arm and what they do"))
    set_flags = add_target_options(
        flag_commands.add_parser("set", help="e.g. dtrag flags set soft_q_bandit=on --arm treatment"))
    set_flags.add_argument("assignments", nargs="+", metavar="NAME=on|off")
    set_flags.add_argument("--arm", choices=ARMS, default=Arm.TREATMENT)
    flags.set_defaults(handler=cmd_flags)

    rollout = commands.add_parser("rollout", help="progressive rollout of the treatment arm")
    rollout_commands = rollout.add_subparsers(dest="rollout_command", required=True)
    add_target_options(rollout_commands.add_parser("status", help="stage, weights, per-arm gates"))
    add_target_options(rollout_commands.add_parser("advance", help="move to the next stage"))
    rollback = add_target_options(rollout_commands.add_parser("rollback", help="treatment to 0% now"))
    rollback.add_argument("--reason", default="rolled back by operator")
    weight = add_target_options(
        rollout_commands.add_parser("set-weight", help="set the treatment's share (0..1)"))
    weight.add_argument("weight", type=float)
    rollout.set_defaults(handler=cmd_rollout)

    policy = commands.add_parser("policy", help="promote a candidate policy, list promotions, roll one back")
    policy_commands = policy.add_subparsers(dest="policy_command", required=True)
    promote = add_target_options(policy_commands.add_parser(
        "promote", help="judge a candidate file against the live policy on logged searches, then serve it"))
    promote.add_argument("candidate", type=Path, help="a candidate policy file (python -m cluster.jobs.train)")
    promote.add_argument("--force", action="store_true",
                         help="serve it even when judged worse than the live policy, or when it cannot be judged")
    add_target_options(policy_commands.add_parser("rollback", help="serve the policy the latest promotion replaced"))
    history = add_target_options(policy_commands.add_parser("history", help="promotions and rollbacks, newest first"))
    history.add_argument("--limit", type=int, default=20)
    policy.set_defaults(handler=cmd_policy)
