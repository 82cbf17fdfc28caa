"""GraphQL reads at scale: one big nested query against a hand-written query and the
graphql-core floor, measured in the same run.

    .venv/bin/python -m benchmarks.graphql_read [--backend sqlite|postgresql|both]
        [--profiles N] [--requests N]

Per backend, in one run:
1. seed: --profiles profiles (default 500), each linked to 2 of 10 services (its own token
   on each link; each service has a shared token too) and 2 of 10 proxies (one the
   default), written through the ORM before the clock starts.
2. the real app under uvicorn on 127.0.0.1 (no embedded runner), with two extra routes on
   the same server, behind the same middleware and the same admin API token:
   - `POST /bench/handwritten`: the baseline, three hand-written SQLAlchemy Core SELECTs
     (the page of profiles; their service links with the services; their proxy links with
     the proxies) on the app's sessionmaker, the links' tokens decrypted for their
     previews, serialised to the same JSON as the GraphQL answer;
   - `POST /bench/floor`: graphql-core's execution floor, the same query executed by
     graphql-core on a schema of the same shape whose fields resolve from ready dicts
     (graphql-core's default resolver; no database, no Strawberry), serialised likewise.
   A client in its own process POSTs each --requests times, one after another on one
   keep-alive connection, and times each round trip: `/graphql` with QUERY, then the two
   baselines. The three answers must be the same JSON (checked).
Also reported: the floor executed in this process without HTTP; the server's CPU time a
request for each endpoint, and its ratio (steadier than latencies on a shared host); and
per GraphQL query the SQL statements the app sent (its authentication's included) and the
secrets it decrypted.
Target (issue #16): GraphQL p50 <= 3x the hand-written query's, on both databases.
Prints one JSON object on stdout; progress on stderr.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from benchmarks.common import (
    CpuClock,
    Worker,
    backend_settings,
    percentiles,
    progress,
    run_benchmark,
    serve,
)

RATIO_TARGET = 3.0
SERVICES = 10
PROXIES = 10

QUERY = """
query Read($first: Int) {
  profiles(first: $first) {
    edges {
      node {
        id
        name
        services { service { id name } hasToken tokenPreview }
        proxies { id name host port }
        defaultProxy { id }
      }
    }
  }
}
"""

FLOOR_SDL = """
type Query { profiles(first: Int): ProfileConnection! }
type ProfileConnection { edges: [ProfileEdge!]! }
type ProfileEdge { node: Profile! }
type Profile {
  id: ID!
  name: String!
  services: [ProfileServiceLink!]!
  proxies: [Proxy!]!
  defaultProxy: Proxy
}
type ProfileServiceLink { service: Service! hasToken: Boolean! tokenPreview: String }
type Service { id: ID! name: String! }
type Proxy { id: ID! name: String! host: String! port: Int! }
"""


async def seed(app: Any, profiles: int) -> None:
    """The profiles, services and proxies, every token encrypted with the app's key."""
    from server.models import Profile, ProfileProxy, ProfileService, Proxy, Service

    services = app.state.services
    box = services.secret_box
    async with services.sessionmaker() as session:
        svc = [
            Service(
                name=f"service-{i:02d}",
                env_var=f"SERVICE_{i}_TOKEN",
                token_encrypted=box.encrypt(f"shared-token-of-service-{i:02d}"),
            )
            for i in range(SERVICES)
        ]
        px = [
            Proxy(name=f"proxy-{i:02d}", protocol="http", host=f"10.0.0.{i + 1}", port=3128 + i)
            for i in range(PROXIES)
        ]
        rows = [Profile(name=f"profile-{n:04d}") for n in range(profiles)]
        session.add_all([*svc, *px, *rows])
        await session.flush()
        for n, row in enumerate(rows):
            for k in (0, 1):
                service = svc[(n + k * 3) % SERVICES]
                token = box.encrypt(f"ghp_own-token-{n:05d}-of-{service.name}")
                session.add(
                    ProfileService(profile_id=row.id, service_id=service.id, token_encrypted=token)
                )
                proxy = px[(n + k * 7) % PROXIES]
                session.add(ProfileProxy(profile_id=row.id, proxy_id=proxy.id, is_default=k == 0))
        await session.commit()


async def handwritten(services: Any, first: int) -> dict[str, Any]:
    """The query's answer from three hand-written SELECTs (the baseline)."""
    from sqlalchemy import select

    from server.ids import encode_global_id
    from server.models import Profile, ProfileProxy, ProfileService, Proxy, Service
    from server.secretbox import token_preview

    box = services.secret_box
    async with services.sessionmaker() as session:
        page = (
            await session.execute(
                select(Profile.id, Profile.name).order_by(Profile.id).limit(first)
            )
        ).all()
        ids = [row.id for row in page]
        links = (
            await session.execute(
                select(
                    ProfileService.profile_id,
                    ProfileService.token_encrypted,
                    Service.id,
                    Service.name,
                )
                .join(Service, Service.id == ProfileService.service_id)
                .where(ProfileService.profile_id.in_(ids))
                .order_by(Service.name)
            )
        ).all()
        uses = (
            await session.execute(
                select(
                    ProfileProxy.profile_id,
                    ProfileProxy.is_default,
                    Proxy.id,
                    Proxy.name,
                    Proxy.host,
                    Proxy.port,
                )
                .join(Proxy, Proxy.id == ProfileProxy.proxy_id)
                .where(ProfileProxy.profile_id.in_(ids))
                .order_by(Proxy.name)
            )
        ).all()
    services_of: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for profile_id, token, service_id, service_name in links:
        services_of[profile_id].append(
            {
                "service": {"id": encode_global_id("Service", service_id), "name": service_name},
                "hasToken": token is not None,
                "tokenPreview": None if token is None else token_preview(box.decrypt(token)),
            }
        )
    proxies_of: dict[int, list[dict[str, Any]]] = defaultdict(list)
    default_of: dict[int, dict[str, Any]] = {}
    for profile_id, is_default, proxy_id, name, host, port in uses:
        proxy_gid = encode_global_id("Proxy", proxy_id)
        proxies_of[profile_id].append({"id": proxy_gid, "name": name, "host": host, "port": port})
        if is_default and profile_id not in default_of:
            default_of[profile_id] = {"id": proxy_gid}
    edges = [
        {
            "node": {
                "id": encode_global_id("Profile", pk),
                "name": name,
                "services": services_of.get(pk, []),
                "proxies": proxies_of.get(pk, []),
                "defaultProxy": default_of.get(pk),
            }
        }
        for pk, name in page
    ]
    return {"profiles": {"edges": edges}}


class Floor:
    """graphql-core executing QUERY on a same-shaped schema over ready dicts."""

    def __init__(self, data: dict[str, Any]) -> None:
        from graphql import build_schema, parse

        self.schema = build_schema(FLOOR_SDL)
        self.document = parse(QUERY)
        self.root = data

    def execute(self, first: int) -> dict[str, Any]:
        from graphql import execute

        result = execute(self.schema, self.document, self.root, variable_values={"first": first})
        if result.errors:
            raise RuntimeError(f"the floor query failed: {result.errors}")
        if result.data is None:
            raise RuntimeError("the floor query returned no data")
        return result.data


def add_baseline_routes(app: Any, first: int, floor: list[Floor]) -> None:
    """`/bench/handwritten` and `/bench/floor` on the app (before its own routes)."""
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    async def handwritten_endpoint(_request: Request) -> Response:
        data = await handwritten(app.state.services, first)
        return Response(json.dumps({"data": data}), media_type="application/json")

    async def floor_endpoint(_request: Request) -> Response:
        data = floor[0].execute(first)
        return Response(json.dumps({"data": data}), media_type="application/json")

    app.router.routes.insert(0, Route("/bench/handwritten", handwritten_endpoint, methods=["POST"]))
    app.router.routes.insert(0, Route("/bench/floor", floor_endpoint, methods=["POST"]))


class Tally:
    """SQL statements and decryptions the app makes while it is on."""

    def __init__(self, app: Any) -> None:
        from sqlalchemy import event

        self.statements = self.decryptions = 0
        self.on = False
        event.listen(app.state.engine.sync_engine, "before_cursor_execute", self._statement)
        box = app.state.services.secret_box
        decrypt = box.decrypt

        def counted(ciphertext: bytes) -> str:
            self.decryptions += self.on
            return decrypt(ciphertext)  # type: ignore[no-any-return]

        box.decrypt = counted

    def _statement(self, *_args: Any) -> None:
        self.statements += self.on


async def timed_posts(url: str, body: dict[str, Any], requests: int) -> dict[str, Any]:
    worker = await Worker.start("posts")
    try:
        await worker.send({"url": url, "body": body, "requests": requests})
        return await worker.expect("result", timeout=900)
    finally:
        await worker.close()


def in_process_floor(floor: Floor, first: int, requests: int) -> dict[str, Any]:
    for _ in range(3):
        floor.execute(first)
    samples = []
    for _ in range(requests):
        started = time.perf_counter()
        floor.execute(first)
        samples.append((time.perf_counter() - started) * 1000)
    return percentiles(samples)


def ratio(a: float, b: float) -> float:
    return round(a / b, 2)


async def run_backend(backend: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from server.app import create_app

    async with backend_settings(backend, workdir, embedded_runner=False) as settings:
        app = create_app(settings)
        floor: list[Floor] = []
        add_baseline_routes(app, args.profiles, floor)
        async with serve(app) as base_url:
            progress(f"{backend}: seeding {args.profiles} profiles")
            await seed(app, args.profiles)
            floor.append(Floor(await handwritten(app.state.services, args.profiles)))
            tally = Tally(app)
            body = {"query": QUERY, "variables": {"first": args.profiles}}
            progress(f"{backend}: {args.requests} x the GraphQL query")
            cpu = CpuClock()
            tally.on = True
            graphql = await timed_posts(f"{base_url}/graphql", body, args.requests)
            tally.on = False
            graphql_cpu = cpu.read()
            progress(f"{backend}: {args.requests} x the hand-written query, x the floor")
            cpu = CpuClock()
            hand = await timed_posts(f"{base_url}/bench/handwritten", {}, args.requests)
            hand_cpu = cpu.read()
            cpu = CpuClock()
            floor_http = await timed_posts(f"{base_url}/bench/floor", {}, args.requests)
            floor_cpu = cpu.read()
            floor_direct = in_process_floor(floor[0], args.profiles, args.requests)
        if graphql["body"] != hand["body"] or floor_http["body"] != hand["body"]:
            raise RuntimeError("the GraphQL answer, the hand-written one and the floor's differ")
        queries = args.requests + 3  # the client's untimed warm-up requests count too
        g, h, f = (percentiles(r["latencies_ms"]) for r in (graphql, hand, floor_http))
        return {
            "profiles": args.profiles,
            "response_bytes": graphql["bytes"],
            "graphql_ms": g | {"server_cpu": graphql_cpu},
            "handwritten_ms": h | {"server_cpu": hand_cpu},
            "floor_http_ms": f,
            "floor_execute_in_process_ms": floor_direct,
            "ratio_graphql_to_handwritten": {
                "p50": ratio(g["p50"], h["p50"]),
                "p99": ratio(g["p99"], h["p99"]),
            },
            "ratio_floor_to_handwritten": {
                "p50": ratio(f["p50"], h["p50"]),
                "p99": ratio(f["p99"], h["p99"]),
            },
            # Server CPU a request (warm-ups included), steadier than latency on a busy host.
            "server_cpu_ms_per_request": {
                "graphql": round(graphql_cpu["process"] * 1000 / queries, 1),
                "handwritten": round(hand_cpu["process"] * 1000 / queries, 1),
                "floor": round(floor_cpu["process"] * 1000 / queries, 1),
            },
            "ratio_server_cpu_graphql_to_handwritten": ratio(
                graphql_cpu["process"], hand_cpu["process"]
            ),
            "statements_per_query": round(tally.statements / queries, 1),
            "decryptions_per_query": round(tally.decryptions / queries, 1),
            "meets_target": g["p50"] <= RATIO_TARGET * h["p50"],
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="both", help="sqlite, postgresql or both")
    parser.add_argument("--profiles", type=int, default=500, help="profiles in the page")
    parser.add_argument("--requests", type=int, default=50, help="POSTs per endpoint")
    run_benchmark("graphql_read", parser, run_backend)


if __name__ == "__main__":
    main()
