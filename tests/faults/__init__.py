"""The fault suite: real processes killed and restarted under traffic (issue 16), checking the
promise end to end: no acknowledged write lost, idempotent retries answer the first result,
the node keeps serving everyone else. docs/reliability.md lists each fault with its verdict.

Here: a shard primary killed mid-checkout and the catalog primary killed
(`test_postgres_killed.py`), Redis killed and restarted under cable and rate-limited traffic
(`test_redis_killed.py`), a node SIGKILLed mid-checkout (`test_node_killed_mid_checkout.py`).
Faults tested next to the code they exercise stay there: replica stop, lag and promotion
(tests/handlers/test_replicas_and_failover.py), slow and flooding cable clients
(tests/realtime/test_cable_hostile.py), slowloris and stalled bodies
(tests/adapters/test_http1.py), a node drained or killed behind nginx (tests/edge/).
"""
