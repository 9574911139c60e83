"""Answer latency against the provider's own delay d, and the hard budget, through Ray Serve.

A local server speaking the Gemini REST API (the tests' one) answers every call after exactly d
seconds; the service reaches it with the real google-genai client. For each d, sequential
searches in each mode measure the answer's own time (`answer.latency_ms`) and the whole search
at the client. Baseline, in the same run: d itself, one call's time. A generated answer should
cost about d, a debate about 2d (two drafts at once, then the synthesis), where drafting in turn
would cost 3d and the service this replaces spent 5 blocking calls.

Then the budget: with DTRAG_ANSWER_BUDGET_S = 1 s and a server slower than that (2 s), every
debate request must come back within the budget plus 10%, with an answer and `fallback: budget`.

    .venv/bin/python bench/answers.py [--state-dir /tmp/answers-state] [--searches 20]
"""

from __future__ import annotations

from cluster.platform.runtime import loopback_only_environment

loopback_only_environment()  # before anything imports ray, or Ray binds the machine's address

import argparse  # noqa: E402
import asyncio  # noqa: E402
import dataclasses  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from pathlib import Path  # noqa: E402

import httpx  # noqa: E402
from tqdm import tqdm  # noqa: E402

from _harness import (  # noqa: E402
    BENCH,
    REPO,
    deploy_app,
    local_settings,
    prepare_database,
    ray_serve,
    relative,
    replace_section,
    revoke,
)
from cluster.platform.database import resolve_database_url  # noqa: E402
from cluster.platform.settings import Settings, load_settings  # noqa: E402

sys.path.insert(0, str(REPO / "tests"))  # the tests' local model server
from support.model_servers import ModelServer  # noqa: E402

SECTION = "## Answers: generation and debate latency"
HTTP_PORT = 8500
METRICS_PORT = 9500
KEY = "bench-local-gemini-key"
LATENCY_BUDGET_S = 10.0  # far above every d measured, so nothing is cut
BUDGET_S = 1.0
SLOW_DELAY_S = 2.0
HEALTH_TIMEOUT_S = 300.0
QUERY = "how do vaccines train the immune system?"


@dataclasses.dataclass(frozen=True)
class Timing:
    delay_s: float
    mode: str
    answer_ms: list[float]
    search_ms: list[float]
    fallbacks: list[str | None]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--state-dir", type=Path, default=Path("/tmp/answers-state"),
                        help="DTRAG_STATE_DIR of the embedded database (sample corpus loaded if empty)")
    parser.add_argument("--delays", type=float, nargs="+", default=[0.1, 0.3, 0.6], help="provider delays d (s)")
    parser.add_argument("--searches", type=int, default=20, help="searches per delay and mode")
    parser.add_argument("--budget-searches", type=int, default=50, help="debate searches against the budget")
    parser.add_argument("--plot", type=Path, default=BENCH / "results" / "answer_latency.png")
    parser.add_argument("--results", type=Path, default=BENCH / "RESULTS.md")
    return parser.parse_args(argv)


def bench_settings(state_dir: Path, server: ModelServer, budget_s: float) -> Settings:
    base = load_settings(environ={"DTRAG_STATE_DIR": str(state_dir)})
    base = base.with_database_url(resolve_database_url(None, base.state_dir))
    return dataclasses.replace(
        local_settings(base, HTTP_PORT, METRICS_PORT),
        answers=dataclasses.replace(base.answers, provider="gemini", budget_s=budget_s, call_timeout_s=budget_s),
        gemini=dataclasses.replace(base.gemini, api_key=KEY, base_url=server.gemini_base_url),
    )


def search_once(client: httpx.Client, mode: str) -> tuple[float, float, str | None]:
    """(answer ms, search ms at the client, fallback) of one search."""
    started = time.perf_counter()
    response = client.post("/api/v1/search/", json={"q": QUERY, "final_topk": 5, "answer_mode": mode})
    elapsed_ms = (time.perf_counter() - started) * 1000
    if response.status_code != 200:
        raise RuntimeError(f"search answered HTTP {response.status_code}: {response.text[:300]}")
    answer = response.json()["answer"]
    if not answer["text"] or not answer["citations"]:
        raise RuntimeError(f"an answer without text or citations: {answer}")
    return answer["latency_ms"], elapsed_ms, answer["fallback"]


def measure(client: httpx.Client, server: ModelServer, delay_s: float, mode: str, searches: int,
            progress: tqdm) -> Timing:
    server.reset(delay_s=delay_s)
    search_once(client, mode)  # warm-up, not counted
    answers, searches_ms, fallbacks = [], [], []
    for _ in range(searches):
        answer_ms, search_ms, fallback = search_once(client, mode)
        answers.append(answer_ms)
        searches_ms.append(search_ms)
        fallbacks.append(fallback)
        progress.update(1)
    return Timing(delay_s, mode, answers, searches_ms, fallbacks)


def run(args: argparse.Namespace, server: ModelServer, key: str) -> tuple[list[Timing], Timing]:
    settings = bench_settings(args.state_dir, server, LATENCY_BUDGET_S)
    with ray_serve(settings) as url, httpx.Client(base_url=url, headers={"X-API-Key": key}, timeout=60) as client:
        deploy_app(settings, url, HEALTH_TIMEOUT_S)
        timings = []
        with tqdm(total=len(args.delays) * 2 * args.searches, desc="latency vs d", unit="search") as progress:
            for delay_s in args.delays:
                for mode in ("generated", "debate"):
                    timings.append(measure(client, server, delay_s, mode, args.searches, progress))
        budget_settings = bench_settings(args.state_dir, server, BUDGET_S)
        deploy_app(budget_settings, url, HEALTH_TIMEOUT_S)
        with tqdm(total=args.budget_searches, desc=f"budget {BUDGET_S:g} s, d {SLOW_DELAY_S:g} s",
                  unit="search") as progress:
            budget = measure(client, server, SLOW_DELAY_S, "debate", args.budget_searches, progress)
    return timings, budget


def median(values: list[float]) -> float:
    return statistics.median(values)


def table(timings: list[Timing]) -> str:
    lines = ["| d (s) | mode | answer p50 ms | answer p95 ms | answer / d | search p50 ms | fallbacks |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for t in timings:
        p95 = statistics.quantiles(t.answer_ms, n=20)[18] if len(t.answer_ms) > 1 else t.answer_ms[0]
        lines.append(f"| {t.delay_s:g} | {t.mode} | {median(t.answer_ms):.0f} | {p95:.0f} | "
                     f"{median(t.answer_ms) / (1000 * t.delay_s):.2f} | {median(t.search_ms):.0f} | "
                     f"{sum(f is not None for f in t.fallbacks)} |")
    return "\n".join(lines)


def budget_summary(budget: Timing) -> str:
    limit_ms = 1.1 * BUDGET_S * 1000
    within = sum(ms <= limit_ms for ms in budget.search_ms)
    reasons = {reason: budget.fallbacks.count(reason) for reason in set(budget.fallbacks)}
    return (f"Budget {BUDGET_S:g} s, provider delay {SLOW_DELAY_S:g} s, {len(budget.search_ms)} debate searches: "
            f"{within} of {len(budget.search_ms)} returned within {limit_ms:.0f} ms at the client "
            f"(max {max(budget.search_ms):.0f} ms, p50 {median(budget.search_ms):.0f} ms); "
            f"fallbacks {reasons}; every answer had text and citations.")


def plot(timings: list[Timing], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    delays = sorted({t.delay_s for t in timings})
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for mode, marker in (("generated", "o"), ("debate", "s")):
        points = [t for t in timings if t.mode == mode]
        axes.plot([t.delay_s for t in points], [median(t.answer_ms) / 1000 for t in points], marker=marker,
                  label=f"{mode} (p50)")
    for factor, style in ((1, ":"), (2, "--"), (3, "-.")):
        axes.plot(delays, [factor * d for d in delays], style, color="0.6", label=f"{factor} d")
    axes.set_xlabel("provider delay per call, d (s)")
    axes.set_ylabel("answer time (s)")
    axes.set_title("Answer time against the provider's delay (debate drafts concurrently)")
    axes.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    with ModelServer() as server:
        settings = bench_settings(args.state_dir, server, LATENCY_BUDGET_S)
        assert settings.database.url
        key = asyncio.run(prepare_database(settings, "bench-answers"))
        try:
            timings, budget = run(args, server, key)
        finally:
            asyncio.run(revoke(settings.database.url, key))
    print(table(timings))
    print(budget_summary(budget))
    plot(timings, args.plot)
    body = "\n".join([
        f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; 2 cores; the run took "
        f"{time.perf_counter() - started:.0f} s.",
        "",
        "```",
        f".venv/bin/python bench/answers.py --searches {args.searches} --budget-searches {args.budget_searches}",
        "```",
        "",
        "A local server speaking the Gemini REST API answers each call after d seconds; the service calls it "
        "through google-genai. Sequential searches on the sample corpus, one warm-up each. `answer / d` is the "
        "answer's own time over one call's: about 1 for a generated answer, about 2 for a debate (two drafts at "
        "once, then a synthesis); drafting in turn would give 3. `search` is the whole request at the client.",
        "",
        table(timings),
        "",
        budget_summary(budget),
        "",
        f"Plot: `{relative(args.plot)}`.",
    ])
    replace_section(args.results, SECTION, body)
    print(f"wrote {relative(args.plot)} and the section '{SECTION}' of {relative(args.results)}")
    limit_ms = 1.1 * BUDGET_S * 1000
    return 0 if all(ms <= limit_ms for ms in budget.search_ms) else 1


if __name__ == "__main__":
    sys.exit(main())
