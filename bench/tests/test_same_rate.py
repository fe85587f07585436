"""CPU per saga at one rate for both systems: the saga's own work, set apart from what a
worker's consumer saves per message at a higher rate."""

from bench.report import same_rate_cpu, table
from bench.run import ratios


def _phase(rate: float, total: float, groups: dict[str, float], consumers: dict[str, float]) -> dict:
    return {
        "rate": rate,
        "sagas_per_s": rate,
        "latency_ms": {"p50": 1.0, "p95": 2.0, "p99": 3.0, "max": 4.0},
        "cpu_ms_per_saga": total,
        "cpu_ms_per_saga_by_group": groups,
        "cpu_ms_per_saga_main_process": consumers,
    }


SAGA = {
    "rate_half": _phase(
        26.1,
        36.0,
        {"web": 5.0, "inventory": 5.3, "postgresql": 4.0, "saga": 0.7, "beat": 0.2},
        {"web": 0.1, "inventory": 2.8, "saga": 0.3, "beat": 0.2},
    )
}
BARE = {"rate_half": _phase(26.1, 24.0, {"web": 2.8, "inventory": 4.9, "postgresql": 1.5}, {"inventory": 2.9})}


def test_each_worker_is_shown_as_its_pool_and_its_consumer_at_one_rate() -> None:
    lines = same_rate_cpu({"saga": SAGA, "bare_chain": BARE})
    assert "at 26.1/s: all 36.00 / 24.00 (1.50 x)" in lines[2]
    shown = lines[3]
    assert "inventory pool 2.50 / 2.00" in shown
    assert "inventory consumer 2.80 / 2.90" in shown
    assert "saga pool 0.40 / 0.00" in shown and "saga consumer 0.30 / 0.00" in shown
    # Anything but a Celery worker is shown whole.
    assert "web 5.00 / 2.80" in shown and "beat 0.20 / 0.00" in shown and "postgresql 4.00 / 1.50" in shown
    assert "CPU per saga at the same rate" in table({"saga": SAGA, "bare_chain": BARE})


def test_a_run_without_both_systems_at_one_rate_shows_nothing() -> None:
    assert same_rate_cpu({"saga": SAGA}) == []
    assert same_rate_cpu({"saga": SAGA, "bare_chain": {"rate_20": BARE["rate_half"]}}) == []


def test_the_ratio_of_cpu_per_saga_at_one_rate_is_in_the_ratios() -> None:
    out = ratios({"saga": SAGA, "bare_chain": BARE})
    assert out["cpu_per_saga_rate_half_vs_bare"] == 1.5
    assert "cpu_per_saga_rate_20_vs_bare" not in out


def test_a_phase_without_cpu_counted_is_shown_without_a_ratio() -> None:
    idle = {"rate_half": {**BARE["rate_half"], "cpu_ms_per_saga": 0.0}}
    assert same_rate_cpu({"saga": SAGA, "bare_chain": idle})[2].strip() == "at 26.1/s: all 36.00 / 0.00"
