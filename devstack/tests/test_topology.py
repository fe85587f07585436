"""Replicas of the Procfile's processes (devstack.topology): each worker replica is a node of
its own, from the Procfile's own command; beat is repeated as it is."""

import pytest

from devstack.topology import WORKERS, program_of, read_procfile, replica_command, replica_name


def test_each_worker_replica_gets_a_node_name_of_its_own() -> None:
    procfile = read_procfile()
    for program in WORKERS:
        first, second = (replica_command(procfile[program], replica_name(program, i)) for i in (1, 2))
        assert first == procfile[program]
        assert f"-n {program}@%h" in first
        assert second == first.replace(f"-n {program}@%h", f"-n {program}-2@%h")
        assert program_of(replica_name(program, 2)) == program_of(program) == program


def test_beat_and_web_replicas_run_the_procfiles_command_unchanged() -> None:
    procfile = read_procfile()
    assert replica_command(procfile["beat"], "beat-2") == procfile["beat"]
    assert program_of("beat-2") == "beat"
    # Only the replicated programs have replicas; other names with a number stay whole.
    assert program_of("web-2") == "web-2"


def test_a_worker_command_without_its_node_name_is_refused() -> None:
    with pytest.raises(ValueError, match="does not name its node"):
        replica_command("celery -A orders_project worker -Q inventory", "inventory-2")
