import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from learners.state_encoder import AGREEMENTS, DIGITS, FORMS, LENGTHS, encode_state

IDS = [f"d{i}" for i in range(10)]
QUERIES = [
    "who wrote hamlet",
    "python asyncio timeout",
    "The Eiffel Tower is in Berlin",
    "is coffee bad for you",
    "covid 19 vaccine side effects in children under 5 years",
    "Ωmega café résumé?",
    "",
]


def key(query: str, lexical=IDS, dense=IDS) -> dict[str, str]:
    return dict(part.split("=") for part in encode_state(query, lexical, dense).split("|"))


@pytest.mark.parametrize(
    ("query", "form"),
    [
        ("who wrote hamlet", "question"),
        ("Does aspirin thin blood", "question"),
        ("aspirin dose?", "question"),
        ("python asyncio timeout", "keyword"),
        ("The Eiffel Tower is in Berlin", "statement"),
        ("vitamin C prevents colds", "keyword"),
    ],
)
def test_form(query, form):
    assert key(query)["form"] == form


@pytest.mark.parametrize(
    ("n_tokens", "length"), [(0, "short"), (3, "short"), (4, "medium"), (8, "medium"), (9, "long")]
)
def test_length_buckets(n_tokens, length):
    assert key(" ".join(["word"] * n_tokens))["len"] == length


@pytest.mark.parametrize(
    ("dense", "agree"),
    [
        (IDS, "high"),
        (IDS[:6] + ["x1", "x2", "x3", "x4"], "high"),  # 6 shared: Jaccard 6/14
        (IDS[:5] + ["x1", "x2", "x3", "x4", "x5"], "mid"),  # 5 shared: 5/15
        (IDS[:2] + ["x1", "x2", "x3", "x4", "x5", "x6", "x7", "x8"], "mid"),  # 2/18
        (IDS[:1] + ["x1", "x2", "x3", "x4", "x5", "x6", "x7", "x8", "x9"], "low"),  # 1/19
        ([f"x{i}" for i in range(10)] + IDS, "low"),  # overlap below the top 10 does not count
        ([], "none"),
    ],
)
def test_agreement_buckets(dense, agree):
    assert key("q", IDS, dense)["agree"] == agree


def test_digits():
    assert key("ipv6 rfc")["digits"] == "yes"
    assert key("ip rfc")["digits"] == "no"


def test_every_key_is_one_of_the_72():
    for query in QUERIES:
        for dense in (IDS, IDS[:3], []):
            parts = key(query, IDS, dense)
            assert (parts["len"], parts["form"], parts["agree"], parts["digits"]) in {
                (n, f, a, d) for n in LENGTHS for f in FORMS for a in AGREEMENTS for d in DIGITS}


def test_keys_are_the_same_in_processes_with_other_hash_seeds():
    script = (
        "import json, sys; from learners.state_encoder import encode_state\n"
        "queries, ids = json.load(sys.stdin)\n"
        "keys = [encode_state(q, ids, ids[::-1][:4] + ['x']) for q in queries]\n"
        "print(json.dumps(keys))"
    )
    expected = [encode_state(q, IDS, IDS[::-1][:4] + ["x"]) for q in QUERIES]
    root = Path(__file__).resolve().parents[2]
    for seed in ("1", "4242"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(root)}
        out = subprocess.run(
            [sys.executable, "-c", script],
            input=json.dumps([QUERIES, IDS]),
            capture_output=True,
            text=True,
            check=True,
            env=env,
            cwd=root,
        ).stdout
        assert json.loads(out) == expected
