"""A load test of a running `indexer serve`, with locust (a real load generator: many users, ramp-up,
live statistics, CSV/HTML/JSON reports). Each simulated user sends POST /search back to back.

    indexer serve notes.idx --port 8000 &
    locust -f scripts/locustfile.py --headless -u 64 -r 16 -t 60s --host http://127.0.0.1:8000

Environment (all optional):
  INDEXER_COLLECTION   the served collection to search (needed when the server serves several)
  INDEXER_TOKEN        the server's --token
  INDEXER_QUERIES      a JSONL file of request bodies, e.g. {"query": "red bicycle", "k": 10} or {"vector": [...]}
                       (default: short sentences from a fixed vocabulary, text queries, k=10)
  INDEXER_FIELDS       comma-separated fields each hit should carry (default: the server's default)
Every non-200 answer counts as a failure in locust's statistics.
"""

from __future__ import annotations

import itertools
import json
import os
import random

from locust import FastHttpUser, task

VOCAB = ("river city market price music song star moon sun galaxy bread garden tree flower rain storm road car "
         "train bridge mountain forest ocean ship engine energy plant doctor school library book history "
         "computer network data model search").split()


def request_bodies() -> list[dict]:
    path = os.environ.get("INDEXER_QUERIES")
    if path:
        with open(path, encoding="utf-8") as fh:
            bodies = [json.loads(line) for line in fh if line.strip()]
    else:
        rng = random.Random(7)
        bodies = [{"query": " ".join(rng.choices(VOCAB, k=rng.randint(3, 8))), "k": 10} for _ in range(500)]
    extra = {key: os.environ[env] for key, env in (("collection", "INDEXER_COLLECTION"),) if os.environ.get(env)}
    if os.environ.get("INDEXER_FIELDS"):
        extra["fields"] = os.environ["INDEXER_FIELDS"].split(",")
    return [{**extra, **body} for body in bodies]


BODIES = request_bodies()


class SearchUser(FastHttpUser):
    def on_start(self) -> None:
        self.bodies = itertools.cycle(random.sample(BODIES, len(BODIES)))
        token = os.environ.get("INDEXER_TOKEN")
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}

    @task
    def search(self) -> None:
        self.client.post("/search", json=next(self.bodies), headers=self.headers, name="/search")
