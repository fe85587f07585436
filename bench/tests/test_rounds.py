"""`--rounds`: the throughput ratios of a run whose systems ran alternately, round by round."""

from bench.run import ratios, round_figures, round_order


def _system(sagas_per_s: float, direct: float, cpu_ms: float) -> dict:
    return {
        "saturation": {"sagas_per_s": sagas_per_s, "cpu_ms_per_saga": cpu_ms},
        "direct": {"sagas_per_s": direct, "cpu_ms_per_saga": cpu_ms},
    }


def test_a_round_compares_the_two_systems_it_ran() -> None:
    figures = round_figures(_system(30.0, 33.0, 60.0), _system(60.0, 66.0, 30.0))
    assert figures["saga_vs_bare_throughput"] == 0.5
    assert figures["saga_vs_bare_without_http_throughput"] == 0.5
    assert figures["cpu_per_saga_vs_bare"] == 2.0
    assert figures["saga_sagas_per_s"] == 30.0 and figures["bare_sagas_per_s"] == 60.0


def test_the_runs_ratio_is_the_median_of_its_rounds_not_of_its_first_systems() -> None:
    # The box slowed down while the first round's bare chain ran: its ratio alone says 0.6.
    first = round_figures(_system(30.0, 30.0, 60.0), _system(50.0, 50.0, 30.0))
    second = round_figures(_system(30.0, 30.0, 60.0), _system(75.0, 75.0, 30.0))
    third = round_figures(_system(28.0, 28.0, 60.0), _system(70.0, 70.0, 30.0))
    results = {
        "sagas_per_s": 30.0,
        "bare_chain_sagas_per_s": 50.0,
        "saga": {"direct": {"sagas_per_s": 30.0}},
        "bare_chain": {"direct": {"sagas_per_s": 50.0}},
        "rounds": [first, second, third],
    }
    out = ratios(results)
    assert out["saga_vs_bare_throughput"] == 0.4
    assert out["saga_vs_bare_throughput_rounds"] == [0.6, 0.4, 0.4]
    assert out["saga_vs_bare_without_http_throughput"] == 0.4


def test_one_round_keeps_the_plain_ratio() -> None:
    results = {"sagas_per_s": 30.0, "bare_chain_sagas_per_s": 60.0}
    assert ratios(results) == {"saga_vs_bare_throughput": 0.5}


def test_rounds_alternate_which_system_runs_first() -> None:
    # A box that speeds up during the run favours whichever system runs second in a round:
    # over four rounds each system runs second twice.
    orders = [round_order(number) for number in range(1, 5)]
    assert orders == [("saga", "bare"), ("bare", "saga"), ("saga", "bare"), ("bare", "saga")]
    assert sum(order[1] == "saga" for order in orders) == sum(order[1] == "bare" for order in orders)
