"""A per-action linear value model over context features: soft Q-learning with a pooled prior.

For a context x (the `learners.context` features of a query, shape (d,)) and phi(x) either
[1, x], or with k bins per feature the steps of `learners.context_bins` (edges at the quantiles
of the first BIN_SAMPLE distinct contexts seen, then fixed), shape (D,) = (1 + d (k - 1),):

    Q(x, a)  = theta_a . phi(x)                          theta: (A, D)
    theta_a  = argmin_theta  sum_i w_i (y_i - theta . phi_i)^2 + k |slopes of theta, in standard units|^2
    b(a)     = sum_i w_i y_i / sum_i w_i  over a's samples        the pooled row: Q without context
    y        = r + gamma * V(x'),   V(x) = tau * log sum_a exp(Q(x, a) / tau)   (gamma = 0: a bandit)

The sums run over what learners sampled from prioritized replay (w: the importance weights), kept
as per-action sufficient statistics S_a = sum w phi phi^T and t_a = sum w phi y, so a learner's
delta is a batch's statistics and applying it is an addition. A sampled experience whose search
had every action rewarded (graded feedback) teaches each of them, with weight w / A: the actions'
fits then share their samples, and Q(x, a) - Q(x, b) fits the per-search difference. Fitted on
samples of their own, a query's difficulty, which varies far more than any action's uplift,
would enter each action's fit by how often that action happened to draw it. Once a's sampled
weight exceeds the horizon 1/lr, its statistics are scaled back to it: an exponentially weighted
window that lets Q follow a changing corpus. Features are standardised with the mean and spread of every sample
seen (read from the statistics themselves), so k means the same on any collection: with k = 0
this is least squares; as k grows every slope goes to 0 and Q(x, a) to b(a).

Acting (Dudik et al. call the fallback a "default policy"):

    a_b      = the action with the best mean advantage over the default action a_0, among those
               whose advantage is significant; else a_0                 the best fixed action so far
    a*(x)    = argmax_a Q(x, a) over a_b and the actions whose gate is open,
               if Q(x, a*) - Q(x, a_b) > margin, else a_b
    pi(a|x)  = (1 - eps) 1[a = a*(x)] + eps softmax(Q(x, .) / tau)(a)

An action's advantage is measured on each new query before it is learned from: r(a) - r(a_0)
when every action was rewarded, by inverse propensity otherwise; it is significant when its
one-sided lower bound is above 0, at a 5% error budget shared by the A - 1 candidates (weighted
Bonferroni, below). Picking the largest of A noisy means would otherwise move a small collection
off a good default by chance.

The budget is split equally between the gate groups the owner names (one group: plain
Bonferroni), then equally among each group's candidates. A factorised action space groups its
actions by the first factor: skipping the dense side is one choice that saves a whole stage,
while the others differ from a_b by a fusion weight or a feedback round, whose uplifts are the
smallest and noisiest. With the default grid's seven actions, tested as six equals that one
choice would need its bound at z = 2.39; with half the budget, at z = 1.96.

Each action a other than a_b has a gate: it opens when the pairwise rule "a where Q(x, a) -
Q(x, a_b) > margin, else a_b" has beaten a_b on queries the model had not learned from. One gate
per action, not one for the argmax over all: among several near-equal actions (fusion weights
that differ by 0.005 of nDCG) the argmax mostly follows noise, and its losses there would hide
the one choice that pays (skip the dense side when BM25 alone will do). Queries are split in
FOLDS folds by a stable hash of their context, and for each fold a model is fitted on every other
fold (cross-fitting). Every new experience is scored before it is learned from, by the model that
leaves its fold out: per action, the reward of the rule's choice minus the reward of that model's
a_b, exactly when every action was rewarded, by inverse propensity otherwise. A query that comes
back is judged again, by the current model that leaves its fold out (so still one that never saw
it), and the new judgement replaces the old: the evidence is the current rule's, once per query,
over the last GATE_HORIZON distinct queries. Repeats cannot make an overfit model look good, and
judgements of the early, barely fitted models do not linger while traffic repeats. GATE_HORIZON
is sized by the uplifts a gate must see: telling a 0.005 difference of nDCG from 0 takes 1,300
to 2,200 paired queries. A gate is open while the one-sided lower bound (the weighted Bonferroni
above, over the gates of every action but a_b) of its uplift's mean over those queries is above
0: a collection with too little traffic for the model to generalise gets
the best fixed action, not a noisy per-query one. eps bounds exploration; the owner sets it from
the share of feedback that rewards only the served action (clicks), since graded feedback rewards
every action anyway.

Learning is split so it can be distributed: a learner runs `compute_deltas` on an immutable
`ValueSnapshot`, and the owner (`ValueModel`) applies the `ValueDelta`, bumping `version`.
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import ArrayLike

from learners.context_bins import ContextBins

FORMAT = 8  # state_dict layout: 8 = per-fold, per-action statistics, per-query gate judgements, context bins
FOLDS = 5  # the judging models learn from 4/5 of the queries: close to the served model, never the query
MIN_SAMPLES = 30  # queries of evidence before a normal bound is trusted (advantages, the gate)
GATE_HORIZON = 2000  # distinct queries of gate evidence kept: the model it judged keeps changing
BIN_SAMPLE = 100  # distinct contexts whose quantiles fix the bins' edges (before them: pooled values only)


def _lower_bound(stats: np.ndarray, z: np.ndarray) -> np.ndarray:
    """mean - z * standard error from (n, sum, sum of squares) rows, with z per row (inf: untested);
    -inf below MIN_SAMPLES; (A, 3), (A,) -> (A,)."""
    n, total, squares = stats[..., 0], stats[..., 1], stats[..., 2]
    safe = np.maximum(n, 1.0)
    mean = total / safe
    error = np.sqrt(np.maximum(squares / safe - mean * mean, 0.0) / safe)
    margin = np.multiply(z, error, out=np.full_like(error, np.inf), where=np.isfinite(z))
    return np.where(n >= MIN_SAMPLES, mean - margin, -np.inf)


def _evidence(uplift: np.ndarray) -> np.ndarray:
    """Judgements' terms of the gate's sums, (1, u, u^2, u != 0) per action, zeros where u is NaN;
    (..., A) -> (..., A, 4)."""
    known = ~np.isnan(uplift)
    u = np.where(known, uplift, 0.0)
    return np.stack([known, u, u * u, u != 0], axis=-1).astype(np.float64)


def policy_from_q(q: np.ndarray, tau: float) -> np.ndarray:
    """softmax(q / tau) over the last axis, stable for any q; shape (..., A) -> (..., A)."""
    z = q / tau
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def soft_value_from_q(q: np.ndarray, tau: float) -> np.ndarray:
    """tau * logsumexp(q / tau) over the last axis, stable for any q; shape (..., A) -> (...)."""
    z = q / tau
    m = z.max(axis=-1, keepdims=True)
    return tau * (m + np.log(np.exp(z - m).sum(axis=-1, keepdims=True)))[..., 0]


def context_key(context: ArrayLike) -> int:
    """A stable 64-bit key of a context (the same query on the same corpus has the same one)."""
    rounded = np.round(np.asarray(context, np.float64), 6) + 0.0  # + 0.0: -0.0 and 0.0 hash alike
    return int.from_bytes(hashlib.blake2b(rounded.tobytes(), digest_size=8).digest(), "little")


def fold_of(context: ArrayLike) -> int:
    """The cross-fitting fold of a context."""
    return context_key(context) % FOLDS


def design(contexts: ArrayLike) -> np.ndarray:
    """phi(x) = [1, x] per row; (B, d) -> (B, d + 1)."""
    x = np.atleast_2d(np.asarray(contexts, np.float64))
    return np.hstack([np.ones((len(x), 1)), x])


class Transitions(NamedTuple):
    """B transitions (x, a, r, x'), e.g. a replay sample."""

    contexts: np.ndarray  # (B, d)
    folds: np.ndarray  # (B,) ints in [0, FOLDS): fold_of(context)
    actions: np.ndarray  # (B,) ints in [0, A)
    rewards: np.ndarray  # (B,)
    next_contexts: np.ndarray  # (B, d); rows where has_next is False are ignored
    has_next: np.ndarray  # (B,) bool: False when the episode ended, V(x') counts as 0
    search_rewards: np.ndarray | None = None  # (B, A) every action's reward in the same search; NaN: unknown


@dataclass(frozen=True)
class ValueSnapshot:
    """The policy at one version; treat as immutable (its arrays are read-only)."""

    version: int
    theta: np.ndarray  # (A, D) coefficients on phi(x): raw feature units, or steps
    pooled: np.ndarray  # (A,) b(a)
    seen: np.ndarray  # (A,) experiences each action was rewarded in
    preferred: tuple[int, ...]  # actions significantly better than the default, best first
    default_action: int
    margin: float
    open_actions: tuple[int, ...]  # actions whose gate is open: the context model may choose them
    epsilon: float
    tau: float
    bins: ContextBins | None = None  # None: phi(x) = [1, x]

    @property
    def n_actions(self) -> int:
        return self.theta.shape[0]

    def design(self, contexts: ArrayLike) -> np.ndarray:
        """phi(x) per context; (B, d) -> (B, D)."""
        return design(contexts) if self.bins is None else self.bins.design(contexts)

    @property
    def gate_open(self) -> bool:
        """Whether the context model acts at all."""
        return bool(self.open_actions)

    def values(self, contexts: ArrayLike) -> np.ndarray:
        """Q(x, .) per context; (B, d) -> (B, A)."""
        return self.design(contexts) @ self.theta.T

    def _allowed(self, allowed: np.ndarray | None) -> np.ndarray:
        """Which actions may be chosen (all by default); the default action always may."""
        mask = np.ones(self.n_actions, bool) if allowed is None else np.asarray(allowed, bool).copy()
        mask[self.default_action] = True
        return mask

    def pooled_action(self, allowed: np.ndarray | None = None) -> int:
        """a_b: the first allowed action significantly better than the default, else the default."""
        mask = self._allowed(allowed)
        return next((a for a in self.preferred if mask[a]), self.default_action)

    def beats_pooled(self, contexts: ArrayLike, allowed: np.ndarray | None = None) -> np.ndarray:
        """Where each allowed action beats a_b by the margin, ignoring the gates: what they test; (B, d) -> (B, A)."""
        return self._beats(self.values(contexts), allowed)

    def model_actions(self, contexts: ArrayLike, allowed: np.ndarray | None = None) -> np.ndarray:
        """The best of a_b and the actions that beat it by the margin, ignoring the gates; (B, d) -> (B,)."""
        q = self.values(contexts)
        return self._best(q, self._beats(q, allowed), self.pooled_action(allowed))

    def greedy_actions(self, contexts: ArrayLike, allowed: np.ndarray | None = None) -> np.ndarray:
        """a*(x) per context, as served without exploration: model_actions among the open gates; (B, d) -> (B,)."""
        opened = np.zeros(self.n_actions, bool)
        opened[list(self.open_actions)] = True
        q = self.values(contexts)
        return self._best(q, self._beats(q, allowed) & opened, self.pooled_action(allowed))

    def _beats(self, q: np.ndarray, allowed: np.ndarray | None) -> np.ndarray:
        """Q (B, A) -> where each allowed action's value exceeds a_b's by more than the margin, (B, A)."""
        return self._allowed(allowed) & (q - q[:, [self.pooled_action(allowed)]] > self.margin)

    @staticmethod
    def _best(q: np.ndarray, candidates: np.ndarray, fallback: int) -> np.ndarray:
        """argmax Q over each row's candidates, `fallback` where there are none; (B, A) -> (B,)."""
        return np.where(candidates.any(axis=1), np.where(candidates, q, -np.inf).argmax(axis=1), fallback)

    def probabilities(self, contexts: ArrayLike, allowed: np.ndarray | None = None) -> np.ndarray:
        """pi(.|x) as served: greedy mixed with eps of softmax(Q/tau) over the allowed actions; (B, d) -> (B, A)."""
        greedy = np.eye(self.n_actions)[self.greedy_actions(contexts, allowed)]
        if self.epsilon == 0:
            return greedy
        q = np.where(self._allowed(allowed), self.values(contexts), -np.inf)
        return (1 - self.epsilon) * greedy + self.epsilon * policy_from_q(q, self.tau)


@dataclass(frozen=True)
class ValueDelta:
    """Sufficient statistics of one batch, to add: S (FOLDS, A, D, D) and t (FOLDS, A, D), D = len(phi)."""

    gram: np.ndarray
    target: np.ndarray
    base_version: int  # version of the snapshot it was computed on


def compute_deltas(
    snapshot: ValueSnapshot, batch: Transitions, weights: ArrayLike, gamma: float
) -> tuple[ValueDelta, np.ndarray]:
    """The batch's statistics and TD errors y - Q(x, a) of each row's own action, shape (B,).

    A row with `search_rewards` adds every rewarded action's target with weight w / (actions
    rewarded); a row without, its own action's with weight w. Pure: computed on the snapshot.
    """
    actions = np.asarray(batch.actions, np.int64)
    n_actions, dim = snapshot.theta.shape
    if len(actions) and (actions.min() < 0 or actions.max() >= n_actions):
        raise ValueError(f"actions must be in [0, {n_actions}), got {sorted(set(actions.tolist()))}")
    rows = np.arange(len(actions))
    w = np.asarray(weights, np.float64)
    phi = snapshot.design(batch.contexts)  # (B, D)
    y = np.full((len(actions), n_actions), np.nan)  # (B, A) targets; NaN: that action was not rewarded
    if batch.search_rewards is not None:
        y[:] = batch.search_rewards
    y[rows, actions] = batch.rewards
    has_next = np.asarray(batch.has_next, bool)
    if gamma > 0 and has_next.any():
        y[has_next] += gamma * soft_value_from_q(snapshot.values(batch.next_contexts[has_next]), snapshot.tau)[:, None]
    td = y[rows, actions] - (phi * snapshot.theta[actions]).sum(axis=1)
    taught = ~np.isnan(y)
    share = w / taught.sum(axis=1)  # (B,)
    row, action = np.nonzero(taught)
    cells = (np.asarray(batch.folds, np.int64)[row], action)
    gram = np.zeros((FOLDS, n_actions, dim, dim))
    target = np.zeros((FOLDS, n_actions, dim))
    np.add.at(gram, cells, share[row, None, None] * phi[row, :, None] * phi[row, None, :])
    np.add.at(target, cells, (share[row] * y[row, action])[:, None] * phi[row])
    return ValueDelta(gram, target, snapshot.version), td


class ValueModel:
    """The owner of the statistics: fits theta after each delta and keeps the gate's evidence."""

    def __init__(self, n_actions: int, n_features: int, *, prior_count: float, lr: float, tau: float,
                 margin: float, explore_max: float, default_action: int, bins: int = 0,
                 gate_groups: Sequence[int] | None = None) -> None:
        groups = np.zeros(n_actions, np.int64) if gate_groups is None else np.asarray(gate_groups)
        if (n_actions < 1 or n_features < 0 or prior_count < 0 or not 0 < lr <= 1 or tau <= 0
                or margin < 0 or not 0 <= explore_max <= 1 or not 0 <= default_action < n_actions
                or bins == 1 or bins < 0 or groups.shape != (n_actions,) or groups.dtype.kind not in "iu"):
            raise ValueError(
                "need n_actions >= 1, n_features >= 0, prior_count >= 0, 0 < lr <= 1, tau > 0, margin >= 0, "
                "0 <= explore_max <= 1, 0 <= default_action < n_actions, bins 0 (raw features) or >= 2, "
                f"an integer gate group per action; got {n_actions}, {n_features}, {prior_count}, {lr}, {tau}, "
                f"{margin}, {explore_max}, {default_action}, {bins}, {gate_groups}"
            )
        self.gate_groups = tuple(int(g) for g in groups)
        self.prior_count = prior_count
        self.lr = lr
        self.tau = tau
        self.margin = margin
        self.explore_max = explore_max
        self.default_action = default_action
        self.bins = bins
        self._n_features = n_features
        self._shape = (n_actions, ContextBins.unset(n_features, bins).dim if bins else n_features + 1)
        self._version = 0
        self.forget()

    def forget(self) -> ValueSnapshot:
        """Drop every statistic (a fresh model), as a new version so no replica keeps the old one."""
        n_actions, dim = self._shape
        self._bins = ContextBins.unset(self._n_features, self.bins) if self.bins else None
        self._bin_sample: list[np.ndarray] = []  # distinct contexts until the edges are learned
        self._bins_version = 0  # deltas computed before it used other edges
        self._gram = np.zeros((FOLDS, n_actions, dim, dim))
        self._target = np.zeros((FOLDS, n_actions, dim))
        self._seen = np.zeros(n_actions)
        self._advantage = np.zeros((n_actions, 3))  # per action: n, sum, sum of squares of r(a) - r(a_0)
        self._uplift = np.zeros((n_actions, 4))  # per gate: weight, sum, sum of squares of the uplift, non-zero ones
        # the last GATE_HORIZON distinct contexts' keys, oldest first, each with its row of _judgements:
        # the latest judgement's uplift per action (NaN: seen, but no evidence); _uplift sums their _evidence
        self._judged: collections.OrderedDict[int, int] = collections.OrderedDict()
        self._judgements = np.full((GATE_HORIZON, n_actions), np.nan)
        self._feedback = np.zeros(2)  # weight of experiences rewarding every action, of the others
        return self.refresh()

    @property
    def version(self) -> int:
        return self._version

    def snapshot(self) -> ValueSnapshot:
        """The current policy; later updates replace it rather than change it, so no copy."""
        return self._snapshot

    def observe(self, context: ArrayLike, action: int, rewards: Sequence[float] | None, reward: float,
                propensity: float) -> None:
        """Score the current model on a new experience before it is learned from (the gate's evidence).

        `rewards` has every action's reward when the feedback gave them (graded judgements);
        otherwise only the served `action`'s `reward` and its `propensity` are known.
        """
        if rewards is not None:
            self._feedback[0] += 1
            self._seen += 1
        else:
            self._feedback[1] += 1
            self._seen[action] += 1
        if self._feedback.sum() > 1 / self.lr:
            self._feedback *= (1 / self.lr) / self._feedback.sum()
        key = context_key(context)
        if key not in self._judged:  # a new query: its advantage and its context count once
            self._observe_new(context, rewards, action, reward, propensity)
        judge = self._judges()[fold_of(context)]
        uplift = np.where(judge.beats_pooled(context)[0],
                          self._gain(np.arange(len(self._seen)), judge.pooled_action(), rewards, action, reward,
                                     propensity), 0.0)
        row = self._judged.pop(key, None)  # a repeat's judgement is replaced by the current model's
        if row is None:
            row = len(self._judged) if len(self._judged) < GATE_HORIZON else self._judged.popitem(last=False)[1]
        self._uplift += _evidence(uplift) - _evidence(self._judgements[row])
        self._judgements[row] = uplift
        self._judged[key] = row

    @staticmethod
    def _gain(a: np.ndarray | int, b: int, rewards: Sequence[float] | None, action: int, reward: float,
              propensity: float) -> np.ndarray:
        """r(a) - r(b): exact with every reward, else its inverse-propensity estimate."""
        if rewards is not None:
            return np.asarray(rewards, np.float64)[a] - rewards[b]
        return reward * ((np.asarray(a) == action).astype(np.float64) - (action == b)) / propensity

    def _observe_new(self, context: ArrayLike, rewards: Sequence[float] | None, action: int, reward: float,
                     propensity: float) -> None:
        """A query not among the recent ones: its advantage over the default, and a context for the bins."""
        advantage = self._gain(np.arange(len(self._seen)), self.default_action, rewards, action, reward, propensity)
        self._advantage += np.stack([np.ones_like(advantage), advantage, advantage * advantage], axis=1)
        if self._advantage[:, 0].max() > GATE_HORIZON:
            self._advantage *= GATE_HORIZON / self._advantage[:, 0].max()
        if self._bins is not None and not self._bins.learned:
            self._bin_sample.append(np.asarray(context, np.float64))
            if len(self._bin_sample) >= BIN_SAMPLE:
                self.learn_bins(np.array(self._bin_sample))

    def learn_bins(self, contexts: ArrayLike) -> ValueSnapshot:
        """Fix the bins' edges at the quantiles of `contexts` (N, d), drop what was learned under the old
        ones (the pooled values only: every step was 0), and refuse deltas computed before (`accepts`)."""
        if self._bins is None:
            raise ValueError("this model uses raw features (bins 0): there are no edges to learn")
        self._bins = ContextBins.from_contexts(contexts, self.bins)
        self._bin_sample = []
        self._gram[:] = 0.0
        self._target[:] = 0.0
        self._judgements[:] = np.nan  # judged by models that knew no edges: kept as seen, not as evidence
        self._uplift = np.zeros_like(self._uplift)
        snapshot = self.refresh()
        self._bins_version = snapshot.version
        return snapshot

    def accepts(self, delta: ValueDelta) -> bool:
        """Whether a delta was computed with the current edges (on a snapshot since they were learned)."""
        return delta.base_version >= self._bins_version

    def gates(self) -> list[dict[str, float | None]]:
        """Per action, the cross-fitted uplift of its pairwise rule over the pooled row: n, mean, lower bound.

        The bound (one-sided, at a's share of the 5% budget over every action but a_b) is None
        until MIN_SAMPLES queries were scored on which the rule chose a: its uplift is 0 on every
        other query, and a normal bound over a handful of non-zero values would be a guess.
        """
        preferred = self._preferred()
        lower = _lower_bound(self._uplift[:, :3], self._z(preferred[0] if preferred else self.default_action))
        return [
            {"n": float(n), "deviations": float(deviations), "mean": float(total / n if n else 0.0),
             "lower_95": float(bound) if deviations >= MIN_SAMPLES else None}
            for (n, total, _, deviations), bound in zip(self._uplift, lower, strict=True)
        ]

    def _z(self, reference: int) -> np.ndarray:
        """Per action, the one-sided quantile of its test against `reference` (inf for itself): the 5%
        budget split equally between the gate groups of the other actions, then within each group; (A,)."""
        groups = np.asarray(self.gate_groups)
        candidates = np.arange(len(groups)) != reference
        alpha = np.zeros(len(groups))
        present = np.unique(groups[candidates])
        for group in present:
            members = candidates & (groups == group)
            alpha[members] = 0.05 / (len(present) * members.sum())
        return np.array([NormalDist().inv_cdf(1 - a) if a > 0 else np.inf for a in alpha])

    def _preferred(self) -> tuple[int, ...]:
        """Actions whose advantage over the default is significant (weighted Bonferroni), best mean first."""
        better = np.flatnonzero(_lower_bound(self._advantage, self._z(self.default_action)) > 0)
        means = self._advantage[:, 1] / np.maximum(self._advantage[:, 0], 1.0)
        return tuple(int(a) for a in better[np.argsort(-means[better], kind="stable")])

    def epsilon(self) -> float:
        """explore_max times the share of recent feedback that rewarded only the served action."""
        graded, clicks = self._feedback
        share = clicks / (graded + clicks) if graded + clicks else 1.0
        return float(self.explore_max * share)

    def refresh(self) -> ValueSnapshot:
        """A new version with the current gate and exploration rate (after `observe` calls)."""
        self._version += 1
        self._snapshot = self._fit()
        return self._snapshot

    def apply_deltas(self, delta: ValueDelta) -> int:
        """Add a learner's statistics, forget beyond the horizon, refit; returns the new version."""
        if not self.accepts(delta):
            raise ValueError(f"delta computed on version {delta.base_version}, before the bins' edges were "
                             f"learned at version {self._bins_version}")
        self._gram += delta.gram
        self._target += delta.target
        horizon = 1 / self.lr
        weight = self._gram[:, :, 0, 0].sum(axis=0)  # (A,) over every fold
        scale = np.where(weight > horizon, horizon / np.maximum(weight, horizon), 1.0)
        self._gram *= scale[None, :, None, None]
        self._target *= scale[None, :, None]
        return self.refresh().version

    def _fit(self) -> ValueSnapshot:
        """The served model on every sample; the gate's judges are fitted when a query needs them."""
        open_actions = tuple(a for a, gate in enumerate(self.gates())
                             if gate["lower_95"] is not None and gate["lower_95"] > 0)
        seen = self._seen.copy()
        seen.flags.writeable = False
        self._shared = (seen, self._preferred(), self.epsilon())  # what every snapshot of this version shares
        self._holdout: list[ValueSnapshot] | None = None
        return self._snapshot_of(self._gram.sum(axis=0), self._target.sum(axis=0), open_actions)

    def _judges(self) -> list[ValueSnapshot]:
        """Per fold, the model fitted without it (cross-fitting): learners' updates only refit them
        once a new query is judged, not on every delta."""
        if self._holdout is None:
            gram, target = self._gram.sum(axis=0), self._target.sum(axis=0)
            self._holdout = [self._snapshot_of(gram - self._gram[f], target - self._target[f], ())
                             for f in range(FOLDS)]
        return self._holdout

    def _snapshot_of(self, gram: np.ndarray, target: np.ndarray, open_actions: tuple[int, ...]) -> ValueSnapshot:
        """theta_a by ridge in standard units (slopes shrunk to 0 by k, intercept free), per action."""
        n_actions, dim = target.shape
        weight = gram[:, 0, 0]
        pooled = np.divide(target[:, 0], weight, out=np.zeros(n_actions), where=weight > 0)
        theta = np.zeros((n_actions, dim))
        total = gram.sum(axis=0)
        if total[0, 0] > 0:
            # z = (x - mu) / sigma over every sample; phi_z = T phi_raw, so S_z = T S T^T.
            mu = total[0, 1:] / total[0, 0]
            sigma = np.sqrt(np.maximum(np.diag(total)[1:] / total[0, 0] - mu * mu, 0.0))
            sigma = np.where(sigma > 1e-9, sigma, 1.0)
            transform = np.eye(dim)
            transform[1:, 0] = -mu / sigma
            transform[1:, 1:] = np.diag(1 / sigma)
            penalty = self.prior_count * np.diag([0.0] + [1.0] * (dim - 1))
            for a in np.flatnonzero(weight > 0):
                gram_z = transform @ gram[a] @ transform.T
                theta_z = np.linalg.lstsq(gram_z + penalty, transform @ target[a], rcond=None)[0]
                theta[a] = transform.T @ theta_z
        for array in (theta, pooled):
            array.flags.writeable = False
        seen, preferred, epsilon = self._shared
        return ValueSnapshot(self._version, theta, pooled, seen, preferred, self.default_action, self.margin,
                             open_actions, epsilon, self.tau, self._bins)

    def state_dict(self) -> dict[str, Any]:
        """Plain values: hyperparameters, version and statistics."""
        return {
            "format": FORMAT, "prior_count": self.prior_count, "lr": self.lr, "tau": self.tau,
            "margin": self.margin, "explore_max": self.explore_max, "default_action": self.default_action,
            "version": self._version, "gram": self._gram.copy(), "target": self._target.copy(),
            "seen": self._seen.copy(), "advantage": self._advantage.copy(),
            "judged_keys": list(self._judged),
            "judged": _evidence(self._judgements[list(self._judged.values())]),
            "feedback": self._feedback.copy(),
            "bins": None if self._bins is None else self._bins.edges.copy(),
            "bin_sample": [c.copy() for c in self._bin_sample],
            "bins_version": self._bins_version,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a `state_dict`; ValueError for another layout, action count or feature count.

        The statistics come from the state; the hyperparameters stay as configured now.
        """
        if state.get("format") != FORMAT:
            raise ValueError(f"value model state has layout {state.get('format', 1)}, this code reads {FORMAT}")
        gram = np.array(state["gram"], np.float64)
        if gram.shape != self._gram.shape:
            raise ValueError(f"state has statistics of shape {gram.shape}, the model {self._gram.shape}")
        edges = None if state["bins"] is None else np.array(state["bins"], np.float64)
        expected = None if self._bins is None else self._bins.edges.shape
        if (edges is None) != (expected is None) or (edges is not None and edges.shape != expected):
            raise ValueError(f"state has context bins {None if edges is None else edges.shape}, "
                             f"the model {expected} ({self.bins} bins per feature)")
        self._gram = gram
        self._target = np.array(state["target"], np.float64)
        self._seen = np.array(state["seen"], np.float64)
        self._advantage = np.array(state["advantage"], np.float64)
        judged = np.array(state["judged"], np.float64).reshape(-1, *self._uplift.shape)[-GATE_HORIZON:]
        keys = [int(key) for key in state["judged_keys"]][-GATE_HORIZON:]
        self._judged = collections.OrderedDict((key, row) for row, key in enumerate(keys))
        self._judgements[:] = np.nan
        self._judgements[:len(judged)] = np.where(judged[..., 0] > 0, judged[..., 1], np.nan)
        self._uplift = judged.sum(axis=0)
        self._feedback = np.array(state["feedback"], np.float64)
        self._bins = None if edges is None else ContextBins(edges)
        self._bin_sample = [np.array(c, np.float64) for c in state["bin_sample"]]
        self._bins_version = int(state["bins_version"])
        self._version = int(state["version"])
        self._snapshot = self._fit()
