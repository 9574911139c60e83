"""Does the policy's context predict, on queries it never learned from, when the dense side pays?

The learned policy earns its cost-adjusted reward by skipping the dense side (embedding, kNN,
complete scores, fusion) where BM25 alone will do. Whether it can depends on one thing: whether
the lexical stage's statistics (`learners.context`) predict the dense side's uplift on *new*
queries. This measures that, outside the live loop's replay, gates and noise.

Every judged query of the collection is ranked once under every action through the running
service (`/api/v1/rank` with `every_action`: lists, measured CPU, the context). Then, per seed's
split (`cluster.data.beir.load_split`: BEIR's training qrels when present), models of the choice
"lexical or the default action" are fitted on the training queries and judged two ways:

- cross-fitted on the training queries (5 folds by `learners.value_model.fold_of`, as the live
  gate judges the model), and
- on the test queries, which no model saw.

Models, each acting where its estimated reward advantage of `lexical` over the default action
exceeds the policy margin, with reward = nDCG@10 - cost_weight x expected CPU ms (the mean
measured cost of each action on the training queries):

- ridge on reward: the served value model (`learners.value_model.ValueModel`, the configured
  prior_count), fitted once on every training query with equal weights, on the raw features and
  on k quantile steps per feature (`learners.context_bins`, edges from the training contexts;
  the configured k is the served one);
- sign, logistic: the uplift's sign (lexical worse / tie / better) by multinomial logistic
  regression, times each class's mean uplift: E[delta | x] = sum_c P(c | x) m_c. nDCG differences
  are mostly exact ties with a heavy tail, which a least-squares fit of the raw difference chases;
- sign, boosted trees: the same with depth-3 gradient-boosted trees.

and, as the ceiling, an oracle that knows each test query's own uplift and cost (the most any
context could win; the profile printed with it says why lexical statistics fall short of it).

Would more information at the moment of the choice reach that ceiling? The probe variant embeds
the query first (its CPU measured here, one torch thread as in the embedder replica) and adds
what the embedding says about the lexical candidates (`probe_context`: the cosines of BM25's top
100, read from the database) to the context; a skip then saves only kNN, complete scores and
fusion. It is judged against the same decision with the lexical context alone after the same
embedding, so the rows say what the cosines add, not what the embedding costs.

Test rewards charge each query's measured CPU, as `dtrag train` does. Intervals are paired
bootstraps over queries, a query's rows across seeds resampled together.

    .venv/bin/pip install -e '.[bench]'                                  # scikit-learn
    DTRAG_STATE_DIR=/tmp/bench-state .venv/bin/dtrag up --no-sample &   # the dataset ingested
    DTRAG_STATE_DIR=/tmp/bench-state .venv/bin/python bench/context_transfer.py --dataset PATH/TO/scifact --seeds 5
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
from collections.abc import Callable, Sequence
from pathlib import Path

import httpx
import numpy as np
from sklearn.ensemble import HistGradientBoostingClassifier
from tqdm import tqdm

from _harness import BENCH, replace_section
from cluster.cli.service import add_target_options, service_target
from cluster.clients.train import REQUEST_TIMEOUT_S, rank_every_action
from cluster.core.actions import LEXICAL_ONLY
from cluster.data.beir import QuerySplit, load_split
from cluster.platform.database import create_pool, resolve_database_url
from cluster.platform.settings import Settings, load_settings
from learners.policy_scores import TestMatrix, paired_bootstrap, queries_needed
from learners.value_model import FOLDS, Transitions, ValueModel, compute_deltas, fold_of, policy_from_q
from serve_app.embedding import TextEmbedder
from serve_app.retrieval import DocumentIndex

SECTION = "## Context transfer: does the lexical stage predict when the dense side pays?"
ORACLE = "oracle: each query's own uplift known"
COST_SCALES = (0.8, 1.0, 1.2, 1.4)  # the served model again with every measured cost scaled by these
RIDGE_L2 = 1.0  # logistic regression's penalty on standardised slopes, per training query
NEWTON_STEPS = 50

# A decision model: (train contexts (N, d), train uplift of lexical over the default (N,),
# contexts to decide on (M, d), seed) -> estimated nDCG uplift of lexical over the default, (M,).
UpliftModel = Callable[[np.ndarray, np.ndarray, np.ndarray, int], np.ndarray]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", type=Path, required=True, help="a BEIR folder the service has ingested")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=4)
    add_target_options(parser)  # --url and --api-key, as `dtrag train` takes them
    parser.add_argument("--results", type=Path, default=BENCH / "RESULTS.md")
    return parser.parse_args(argv)


# --- models -------------------------------------------------------------------------------------


def _standardise(train: np.ndarray, other: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean, spread = train.mean(axis=0), train.std(axis=0)
    spread[spread == 0] = 1.0
    return (train - mean) / spread, (other - mean) / spread


def uplift_classes(uplift: np.ndarray) -> np.ndarray:
    """0: lexical worse than the default, 1: a tie, 2: lexical better; (N,) -> (N,)."""
    return (np.sign(uplift) + 1).astype(np.int64)


def class_means(uplift: np.ndarray) -> np.ndarray:
    """m_c: the mean uplift of each class (0 for a class with no query); (3,)."""
    classes = uplift_classes(uplift)
    return np.array([uplift[classes == c].mean() if (classes == c).any() else 0.0 for c in range(3)])


def multinomial_logistic(x: np.ndarray, classes: np.ndarray, n_classes: int, l2: float) -> np.ndarray:
    """Coefficients W (K, D) of softmax(phi W^T) by Newton's method, L2 on the slopes; x (N, D) with a
    leading column of ones, classes (N,). Class 0's row stays 0 (the model is identified)."""
    n, dim = x.shape
    free = n_classes - 1
    w = np.zeros((n_classes, dim))
    onehot = np.eye(n_classes)[classes]
    penalty = np.kron(np.eye(free), np.diag([0.0, *[l2 * n] * (dim - 1)]))
    for _ in range(NEWTON_STEPS):
        p = policy_from_q(x @ w.T, 1.0)  # (N, K) class probabilities
        grad = ((onehot - p)[:, 1:].T @ x).reshape(-1) - penalty @ w[1:].reshape(-1)
        pk = p[:, 1:]
        weights = pk[:, :, None] * (np.eye(free)[None] - pk[:, None, :])  # (N, K-1, K-1)
        hessian = np.einsum("nab,ni,nj->aibj", weights, x, x).reshape(free * dim, free * dim) + penalty
        step = np.linalg.solve(hessian + 1e-9 * np.eye(free * dim), grad)
        w[1:] += step.reshape(free, dim)
        if np.abs(step).max() < 1e-8:
            break
    return w


def sign_logistic(train_x: np.ndarray, uplift: np.ndarray, x: np.ndarray, seed: int) -> np.ndarray:
    a, b = _standardise(train_x, x)
    phi_a, phi_b = np.hstack([np.ones((len(a), 1)), a]), np.hstack([np.ones((len(b), 1)), b])
    w = multinomial_logistic(phi_a, uplift_classes(uplift), 3, RIDGE_L2 / len(a))
    return policy_from_q(phi_b @ w.T, 1.0) @ class_means(uplift)


def sign_trees(train_x: np.ndarray, uplift: np.ndarray, x: np.ndarray, seed: int) -> np.ndarray:
    classes = uplift_classes(uplift)
    trees = HistGradientBoostingClassifier(max_depth=3, max_iter=100, learning_rate=0.05, random_state=seed)
    trees.fit(train_x, classes)
    means = class_means(uplift)
    return trees.predict_proba(x) @ means[trees.classes_]


def ridge_on_reward(prior_count: float, bins: int) -> UpliftModel:
    """The value model's Q(x, lexical) - Q(x, default). Ridge is linear in its targets, so fitting
    lexical on the uplift and the default on 0 gives the same difference as fitting each on its
    reward; the cost term is a constant per action, added by the caller like every model's."""
    def model(train_x: np.ndarray, uplift: np.ndarray, x: np.ndarray, seed: int) -> np.ndarray:
        value = ValueModel(2, train_x.shape[1], prior_count=prior_count, lr=1e-9, tau=0.1, margin=0.0,
                           explore_max=0.0, default_action=1, bins=bins)
        if bins:
            value.learn_bins(train_x)
        contexts = np.repeat(train_x, 2, axis=0)  # (2N, d): each query under lexical (0), then default (1)
        rewards = np.column_stack([uplift, np.zeros(len(uplift))]).reshape(-1)
        batch = Transitions(contexts, np.array([fold_of(c) for c in contexts]), np.tile([0, 1], len(train_x)),
                            rewards, contexts, np.zeros(len(contexts), bool))
        delta, _ = compute_deltas(value.snapshot(), batch, np.ones(len(contexts)), gamma=0.0)
        value.apply_deltas(delta)
        q = value.snapshot().values(x)
        return q[:, 0] - q[:, 1]
    return model


# --- the probe after the query embedding --------------------------------------------------------

PROBE_DEPTH = 100  # lexical candidates whose cosines the probe reads (the depth complete scores use)
PROBE_FEATURES = ("first_cosine", "best_cosine_10", "best_cosine_100", "best_rank", "first_lead", "agreement")


def probe_context(query_vector: np.ndarray, candidate_vectors: np.ndarray) -> np.ndarray:
    """What the query embedding says about BM25's candidates (best first, (n, dim)); (6,): the first
    one's cosine, the best cosine in the top 10 and the top 100, how far down the best one lies
    (log1p rank), the first one's lead over the rest of the top 10, and how well the top 10's
    cosine order agrees with BM25's (Spearman). No candidates: zeros."""
    if len(candidate_vectors) == 0:
        return np.zeros(len(PROBE_FEATURES))
    cos = candidate_vectors @ query_vector
    head = cos[:10]
    lead = cos[0] - head[1:].max() if len(head) > 1 else 0.0
    agreement = 0.0
    if len(head) > 2 and head.std() > 0:
        agreement = float(np.corrcoef(np.arange(len(head)), np.argsort(np.argsort(-head)))[0, 1])
    return np.array([cos[0], head.max(), cos.max(), np.log1p(cos.argmax()), lead, agreement])


async def lexical_candidates(client: httpx.AsyncClient, queries: dict[str, str],
                             concurrency: int) -> dict[str, list[str]]:
    """BM25's top `PROBE_DEPTH` ids per query, as the service ranks them; the dense fill of a short
    list (score 0) is left out, since the probe runs before any dense search."""
    semaphore = asyncio.Semaphore(concurrency)
    candidates: dict[str, list[str]] = {}

    async def rank(qid: str, progress: tqdm) -> None:
        async with semaphore:
            response = await client.post("/api/v1/rank", json={"q": queries[qid], "depth": PROBE_DEPTH,
                                                                "strategy": LEXICAL_ONLY})
        response.raise_for_status()
        candidates[qid] = [hit["doc_id"] for hit in response.json()["ranking"] if hit["score"] > 0]
        progress.update(1)

    with tqdm(total=len(queries), desc="lexical candidates", unit="q") as progress:
        await asyncio.gather(*(rank(qid, progress) for qid in queries))
    return candidates


async def document_vectors(settings: Settings, ids: set[str]) -> dict[str, np.ndarray]:
    """The stored embeddings of `ids`, from the service's database."""
    pool = await create_pool(resolve_database_url(settings.database.url, settings.state_dir), settings.database)
    try:
        return await DocumentIndex.configured(pool, settings.retrieval).vectors(sorted(ids))
    finally:
        await pool.close()


def probe_matrix(matrix: TestMatrix, queries: dict[str, str], candidates: dict[str, list[str]],
                 vectors: dict[str, np.ndarray], lexical: int) -> TestMatrix:
    """The matrix of the probe design: context + `probe_context`, and `lexical` now costs the
    query's embedding (spent before the choice)."""
    embedder = TextEmbedder(threads=1)
    probes, embedding_ms = [], []
    for qid in tqdm(matrix.query_ids, desc="embed queries for the probe", unit="q"):
        vector, cpu_ms = embedder.encode_with_cpu([queries[qid]])
        found = [vectors[doc] for doc in candidates[qid] if doc in vectors]
        probes.append(probe_context(vector[0], np.array(found).reshape(-1, vector.shape[1])))
        embedding_ms.append(cpu_ms)
    cost = matrix.cost.copy()
    cost[:, lexical] = embedding_ms
    return dataclasses.replace(matrix, contexts=np.hstack([matrix.contexts, np.array(probes)]), cost=cost)


# --- scoring ------------------------------------------------------------------------------------


@dataclasses.dataclass
class Outcome:
    """Per judged query (rows across seeds), the decision and what it earned against the default."""

    queries: list[str] = dataclasses.field(default_factory=list)
    gain: list[float] = dataclasses.field(default_factory=list)  # reward - the default's reward
    skipped: list[bool] = dataclasses.field(default_factory=list)
    dense_cost: list[float] = dataclasses.field(default_factory=list)  # CPU ms the policy spent
    default_cost: list[float] = dataclasses.field(default_factory=list)


def _score(outcome: Outcome, matrix: TestMatrix, rows: np.ndarray, skip: np.ndarray, lexical: int,
           default: int, cost_weight: float) -> None:
    reward = matrix.quality - cost_weight * matrix.cost
    for row, skipped in zip(rows, skip, strict=True):
        chosen = lexical if skipped else default
        outcome.queries.append(matrix.query_ids[row])
        outcome.gain.append(float(reward[row, chosen] - reward[row, default]))
        outcome.skipped.append(bool(skipped))
        outcome.dense_cost.append(float(matrix.cost[row, chosen]))
        outcome.default_cost.append(float(matrix.cost[row, default]))


def decide(model: UpliftModel, matrix: TestMatrix, train: np.ndarray, target: np.ndarray, lexical: int,
           default: int, cost_weight: float, margin: float, seed: int) -> np.ndarray:
    """Skip the dense side where the estimated reward advantage of lexical exceeds the margin; (M,) bool."""
    uplift = matrix.quality[train, lexical] - matrix.quality[train, default]
    saving = cost_weight * (matrix.cost[train, default].mean() - matrix.cost[train, lexical].mean())
    return model(matrix.contexts[train], uplift, matrix.contexts[target], seed) + saving > margin


def cross_fitted(model: UpliftModel, matrix: TestMatrix, train: np.ndarray, lexical: int, default: int,
                 cost_weight: float, margin: float, seed: int) -> np.ndarray:
    """Each training query decided by the model fitted on the other folds (the gate's folds)."""
    folds = np.array([fold_of(c) for c in matrix.contexts[train]])
    skip = np.zeros(len(train), bool)
    for fold in range(FOLDS):
        inside = folds == fold
        skip[inside] = decide(model, matrix, train[~inside], train[inside], lexical, default, cost_weight,
                              margin, seed)
    return skip


def oracle_skip(matrix: TestMatrix, rows: np.ndarray, lexical: int, default: int, cost_weight: float) -> np.ndarray:
    """The ceiling no context model can pass: skip exactly where each query's own reward (its
    measured quality and CPU) is at least as high under lexical as under the default; (M,) bool."""
    reward = matrix.quality[rows] - cost_weight * matrix.cost[rows]
    return reward[:, lexical] >= reward[:, default]


def uplift_profile(matrix: TestMatrix, rows: np.ndarray, lexical: int, default: int, cost_weight: float,
                   margin: float) -> str:
    """What a skip model must predict: how often lexical ties, loses or wins on nDCG@10, and the
    chance of a loss below which a skip still pays in expectation."""
    uplift = matrix.quality[rows, lexical] - matrix.quality[rows, default]
    losses = uplift[uplift < 0]
    worth = cost_weight * matrix.cost[rows, default].mean() - margin
    threshold = worth / -losses.mean() if len(losses) else float("inf")
    return (f"On these queries lexical ties the default's nDCG@10 on {np.mean(uplift == 0):.0%}, loses on "
            f"{np.mean(uplift < 0):.0%} (by {-losses.mean():.3f} on average) and wins on {np.mean(uplift > 0):.0%}; "
            f"a skip is worth {worth:.4f} beyond the margin, so it pays in expectation only where the "
            f"chance of a loss is below about {threshold:.0%}.")


def summarise(name: str, where: str, outcome: Outcome) -> str:
    gain = np.array(outcome.gain)
    interval = paired_bootstrap(gain, outcome.queries)
    saving = 1 - sum(outcome.dense_cost) / max(sum(outcome.default_cost), 1e-9)
    return (f"| {name} | {where} | {interval} | {np.mean(outcome.skipped):.2f} | {saving:.1%} | "
            f"~{queries_needed(gain):.0f} |")


# --- the run ------------------------------------------------------------------------------------


async def rank_all(url: str, key: str, settings: Settings, splits: list[QuerySplit],
                   concurrency: int) -> tuple[TestMatrix, list[str], str, TestMatrix]:
    """Every query of every split, once, under every action; the service's actions and default
    action; and the matrix of the probe design (`probe_matrix`)."""
    queries: dict[str, str] = {}
    qrels: dict[str, dict[str, float]] = {}
    for split in splits:
        queries.update(split.train | split.test)
        qrels.update({**split.train_qrels, **split.test_qrels})
    async with httpx.AsyncClient(base_url=url, headers={"X-API-Key": key}, timeout=REQUEST_TIMEOUT_S) as client:
        response = await client.get("/api/v1/admin/learning")
        response.raise_for_status()
        model = response.json()["model"]
        actions, default = model["actions"], model["default_action"]
        matrix = await rank_every_action(client, queries, qrels, actions, concurrency,
                                         "rank every judged query under every action")
        candidates = await lexical_candidates(client, queries, concurrency)
    vectors = await document_vectors(settings, {doc for ids in candidates.values() for doc in ids})
    return matrix, actions, default, probe_matrix(matrix, queries, candidates, vectors, actions.index(LEXICAL_ONLY))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    settings = load_settings()
    url, key = service_target(args, settings)
    core = settings.learning.core
    splits = [load_split(args.dataset, seed) for seed in range(args.seeds)]
    matrix, actions, default_name, probed = asyncio.run(rank_all(url, key, settings, splits,
                                                                 args.concurrency))
    lexical, default = actions.index(LEXICAL_ONLY), actions.index(default_name)
    row_of = {qid: row for row, qid in enumerate(matrix.query_ids)}
    models: dict[str, UpliftModel] = {
        "ridge on reward, raw features": ridge_on_reward(core.prior_count, 0),
        **{f"ridge on reward, {k} bins{' (served)' if k == core.context_bins else ''}":
           ridge_on_reward(core.prior_count, k) for k in sorted({2, 3, 4, 6, core.context_bins} - {0})},
        "sign, logistic": sign_logistic,
        "sign, boosted trees": sign_trees,
    }
    served = (f"ridge on reward, {core.context_bins} bins (served)" if core.context_bins
              else "ridge on reward, raw features")
    embedded_first = dataclasses.replace(probed, contexts=matrix.contexts)  # the same costs, no probe
    after_embedding = {  # name: (model, matrix)
        f"after the embedding: {served}, lexical context": (models[served], embedded_first),
        f"after the embedding: {served}, + probe": (models[served], probed),
        "after the embedding: sign, boosted trees, lexical context": (sign_trees, embedded_first),
        "after the embedding: sign, boosted trees, + probe": (sign_trees, probed),
    }
    designs = {name: (model, matrix) for name, model in models.items()} | after_embedding
    wheres = ("cross-fitted on train", "test")
    outcomes = {(name, where): Outcome() for name in models for where in wheres}
    oracle = outcomes[ORACLE, "test"] = Outcome()
    outcomes |= {(name, where): Outcome() for name in after_embedding for where in wheres}
    probe_oracle = outcomes[f"after the embedding: {ORACLE}", "test"] = Outcome()
    # A skip is worth the dense side's cost, which moves with the machine's load from run to run.
    scaled = {scale: (dataclasses.replace(matrix, cost=matrix.cost * scale), Outcome()) for scale in COST_SCALES}
    for seed, split in enumerate(splits):
        train = np.array([row_of[q] for q in split.train])
        test = np.array([row_of[q] for q in split.test])
        args_ = (lexical, default, core.cost_weight, core.margin, seed)
        for name, (model, design) in designs.items():
            _score(outcomes[name, "cross-fitted on train"], design, train,
                   cross_fitted(model, design, train, *args_), lexical, default, core.cost_weight)
            _score(outcomes[name, "test"], design, test,
                   decide(model, design, train, test, *args_), lexical, default, core.cost_weight)
        for outcome, design in ((oracle, matrix), (probe_oracle, probed)):
            _score(outcome, design, test, oracle_skip(design, test, lexical, default, core.cost_weight), lexical,
                   default, core.cost_weight)
        for design, outcome in scaled.values():
            _score(outcome, design, test, decide(models[served], design, train, test, *args_), lexical, default,
                   core.cost_weight)
        print(f"seed {seed}: {split.description}", flush=True)
    rows = [summarise(name, where, outcome) for (name, where), outcome in outcomes.items()]
    body = "\n".join([
        f"{dt.date.today().isoformat()}. Dataset `{args.dataset.name}`, {args.seeds} seeds, {len(matrix.query_ids)} judged queries ranked once "
        f"under every action; choice: `{LEXICAL_ONLY}` or `{actions[default]}`, reward nDCG@10 - "
        f"{core.cost_weight} x CPU ms, margin {core.margin}. The dense side measured "
        f"{matrix.cost[:, default].mean():.1f} CPU ms per search (median {np.median(matrix.cost[:, default]):.1f}): "
        "a skip is worth that times the cost weight, so the gains move with the machine's speed.",
        "",
        "```",
        f"DTRAG_STATE_DIR={settings.state_dir} .venv/bin/python bench/context_transfer.py "
        f"--dataset $DATA/{args.dataset.name} --seeds {args.seeds}",
        "```",
        "",
        f"Split: {splits[0].description}. "
        + uplift_profile(matrix, np.array([row_of[q] for q in splits[0].test]), lexical, default,
                         core.cost_weight, core.margin),
        "",
        f"| model | judged on | reward - {actions[default]} (95% CI) | dense skipped | CPU saved | queries a difference this size needs |",
        "|---|---|---:|---:|---:|---:|",
        *rows,
        "",
        f"The served model (`{served}`) on the test queries with every measured cost scaled, as a slower or "
        "busier machine would measure it:",
        "",
        f"| cost x | dense side, CPU ms | reward - {actions[default]} (95% CI) | dense skipped |",
        "|---:|---:|---:|---:|",
        *(f"| {scale} | {design.cost[:, default].mean():.1f} | {paired_bootstrap(np.array(outcome.gain), outcome.queries)} "
          f"| {np.mean(outcome.skipped):.2f} |" for scale, (design, outcome) in scaled.items()),
    ])
    print(body)
    heading = f"{SECTION} ({args.dataset.name})"
    replace_section(args.results, heading, body)
    print(f"\nrecorded in {args.results} under {heading!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
