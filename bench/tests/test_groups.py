"""The bench's CPU accounting: a group's root (a worker's main process) apart from its pool."""

from bench.load import ProcessGroups


def test_main_delta_counts_only_each_groups_roots() -> None:
    groups = ProcessGroups()
    groups.add_tree("inventory", 10)
    groups.add_named("postgresql", "postgres")
    before = {"inventory": {10: 1.0, 11: 2.0, 12: 2.0}, "postgresql": {30: 5.0}}
    after = {"inventory": {10: 1.5, 11: 3.0, 12: 2.25}, "postgresql": {30: 6.0}}
    assert groups.delta(before, after) == {"inventory": 1.75, "postgresql": 1.0}
    assert groups.main_delta(before, after) == {"inventory": 0.5}


def test_a_root_gone_by_the_end_counts_nothing() -> None:
    groups = ProcessGroups()
    groups.add_tree("web", 20)
    assert groups.main_delta({"web": {20: 1.0}}, {"web": {21: 1.0}}) == {"web": 0.0}
