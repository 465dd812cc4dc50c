"""The cluster probe's reading of `CLUSTER NODES` and what it concludes from two maps in a row:
a planned failover, an unplanned one (writes may be lost), a reshard. (The probe against a real
cluster, SIGKILLs and reshards included, is in test_redis_cluster_faults.py.)"""

from __future__ import annotations

from server.adapters import cluster_health
from server.adapters.cluster_health import TOTAL_SLOTS, ClusterReport, parse_cluster_nodes

A, B, C, RA = "a" * 40, "b" * 40, "c" * 40, "d" * 40


def nodes(*lines: str) -> str:
    return "\n".join(lines) + "\n"


BEFORE = nodes(
    f"{A} 127.0.0.1:7000@17000 myself,master - 0 0 1 connected 0-5460",
    f"{B} 127.0.0.1:7001@17001 master - 0 0 2 connected 5461-10922 [5461->-{C}]",
    f"{C} 127.0.0.1:7002@17002 master - 0 0 3 connected 10923-16383",
    f"{RA} 127.0.0.1:7003@17003 slave {A} 0 0 1 connected",
)


def test_parse_reads_owners_roles_and_failures() -> None:
    topology = parse_cluster_nodes(BEFORE)
    assert topology.owners[0] == A and topology.owners[5461] == B and topology.owners[16383] == C
    assert None not in topology.owners and len(topology.owners) == TOTAL_SLOTS
    assert topology.masters == {A, B, C} and topology.replicas == {RA: A}
    assert topology.addresses[RA] == "127.0.0.1:7003" and not topology.failed
    crashed = parse_cluster_nodes(BEFORE.replace("myself,master", "master,fail"))
    assert crashed.failed == {A}


def test_a_crash_is_unplanned_a_manual_failover_planned_a_reshard_a_move() -> None:
    before = parse_cluster_nodes(BEFORE)
    crashed = parse_cluster_nodes(
        nodes(
            f"{A} 127.0.0.1:7000@17000 master,fail - 0 0 1 disconnected",
            f"{B} 127.0.0.1:7001@17001 master - 0 0 2 connected 5461-10922",
            f"{C} 127.0.0.1:7002@17002 master - 0 0 3 connected 10923-16383",
            f"{RA} 127.0.0.1:7003@17003 myself,master - 0 0 4 connected 0-5460",
        )
    )
    assert cluster_health._failovers(before, crashed) == {RA}
    assert not cluster_health._planned(RA, before, crashed, set())
    # Its lost slots carry the failover's name, the same on every node that sees it.
    health = cluster_health.ClusterHealth(None, 1.0)
    health._compare(before)
    _changed, lost = health._compare(crashed)
    assert set(lost) == set(range(5461)) and set(lost.values()) == {f"{RA}:4"}
    assert cluster_health._moved_slots(before, crashed, {RA}) == 0
    # A manual failover: the old master follows the new one, nobody was ever down.
    manual = parse_cluster_nodes(
        nodes(
            f"{A} 127.0.0.1:7000@17000 slave {RA} 0 0 4 connected",
            f"{B} 127.0.0.1:7001@17001 master - 0 0 2 connected 5461-10922",
            f"{C} 127.0.0.1:7002@17002 master - 0 0 3 connected 10923-16383",
            f"{RA} 127.0.0.1:7003@17003 myself,master - 0 0 4 connected 0-5460",
        )
    )
    assert cluster_health._planned(RA, before, manual, set())
    # ... unless the probe saw the old master silent first (it came back, then was demoted).
    assert not cluster_health._planned(RA, before, manual, {A})
    # A reshard: slot 5461 moved from B to C, no promotion.
    resharded = parse_cluster_nodes(
        BEFORE.replace(f"5461-10922 [5461->-{C}]", "5462-10922").replace(
            "10923-16383", "5461 10923-16383"
        )
    )
    assert cluster_health._failovers(before, resharded) == set()
    assert cluster_health._moved_slots(before, resharded, set()) == 1


def test_a_report_names_the_unreachable_slots() -> None:
    assert ClusterReport(0).reasons() == []
    (reason,) = ClusterReport(5461, ["127.0.0.1:7000: Connection refused"]).reasons()
    assert reason == (
        "redis cluster: 5461 of 16384 slots unreachable (127.0.0.1:7000: Connection refused)"
    )
