"""Queries and relevance judgements of a BEIR-layout dataset (`queries.jsonl`, `qrels/*.tsv`)."""

from __future__ import annotations

import csv
import dataclasses
import json
import random
from collections.abc import Sequence
from pathlib import Path

from cluster.data.corpus import CorpusError


def load_queries(dataset: Path, name: str = "queries.jsonl") -> dict[str, str]:
    """{query id: text} from a JSONL file of `{"_id", "text"}` in the folder `dataset`.

    Unlike documents, a bad query is not skipped: an evaluation on fewer queries than the
    file holds would not measure what it claims. The error names the line to fix.
    """
    path = dataset / name
    queries: dict[str, str] = {}
    with path.open(encoding="utf-8") as stream:
        for number, line in enumerate(stream, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                queries[str(record["_id"])] = str(record["text"])
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise CorpusError(f"{path}, line {number}: not a query {{\"_id\", \"text\"}} ({error!r})") from None
    return queries


def load_qrels(path: Path) -> dict[str, dict[str, float]]:
    """`query-id<TAB>corpus-id<TAB>score` with a header line -> {query: {doc: grade}}."""
    qrels: dict[str, dict[str, float]] = {}
    with path.open(encoding="utf-8") as stream:
        reader = csv.reader(stream, delimiter="\t")
        header = next(reader)
        if header[:2] != ["query-id", "corpus-id"]:
            raise ValueError(f"{path}: expected a header 'query-id<TAB>corpus-id<TAB>score'")
        for row in reader:
            if row:
                qrels.setdefault(row[0], {})[row[1]] = float(row[2])
    return qrels


def split_half(ids: Sequence[str], seed: int) -> tuple[list[str], list[str]]:
    """(train, test): the ids shuffled by `seed`, first half (rounded down) to train.

    Sorting first makes the split depend on the ids and the seed only, not on file order.
    """
    shuffled = sorted(ids)
    random.Random(seed).shuffle(shuffled)
    half = len(shuffled) // 2
    return sorted(shuffled[:half]), sorted(shuffled[half:])


@dataclasses.dataclass(frozen=True)
class QuerySplit:
    train: dict[str, str]
    train_qrels: dict[str, dict[str, float]]
    test: dict[str, str]
    test_qrels: dict[str, dict[str, float]]
    description: str


def _judged(queries: dict[str, str], qrels: dict[str, dict[str, float]], source: str) -> dict[str, str]:
    judged = {qid: text for qid, text in queries.items() if qid in qrels}
    if not judged:
        raise ValueError(f"{source}: no query has judgements")
    return judged


def load_split(dataset: Path, seed: int) -> QuerySplit:
    """Train on BEIR's training qrels (`extra/`) when present, else on half the test queries."""
    test_qrels = load_qrels(dataset / "qrels" / "test.tsv")
    test = _judged(load_queries(dataset), test_qrels, f"{dataset}/qrels/test.tsv")
    extra = dataset / "extra"
    if (extra / "queries_all.jsonl").is_file() and (extra / "qrels_train.tsv").is_file():
        train_qrels = load_qrels(extra / "qrels_train.tsv")
        judged = _judged(load_queries(extra, "queries_all.jsonl"), train_qrels, f"{extra}/qrels_train.tsv")
        train = {qid: text for qid, text in judged.items() if qid not in test}  # keep test unseen
        description = (f"train: {len(train)} queries of extra/qrels_train.tsv; "
                       f"test: {len(test)} queries of qrels/test.tsv")
        return QuerySplit(train, train_qrels, test, test_qrels, description)
    train_ids, test_ids = split_half(list(test), seed)
    description = (f"no training qrels: the {len(test)} judged test queries split in halves by seed "
                   f"{seed}: train on {len(train_ids)}, test on the other {len(test_ids)}")
    return QuerySplit({q: test[q] for q in train_ids}, test_qrels,
                      {q: test[q] for q in test_ids}, test_qrels, description)
