"""The bench's table (stdout) and figure (PNG) from its results dict."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.1f}{unit}"
    return f"{value}{unit}"


def table(results: dict[str, Any]) -> str:
    lines = [""]
    m = results.get("machine", {})
    lines.append(
        f"bench: {m.get('cores')} cores, Python {m.get('python')}, PostgreSQL {m.get('postgresql')}, "
        f"{m.get('broker')}; {results.get('orders')} orders, {results.get('fail_rate', 0):.0%} declined"
    )
    lines.append("")
    header = f"{'system':<22}{'phase':<18}{'sagas/s':>9}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'max ms':>9}"
    lines += [header, "-" * len(header)]
    if results.get("floor_sagas_per_s"):
        lines.append(f"{'floor (1 process)':<22}{'saturation':<18}{_fmt(results['floor_sagas_per_s']):>9}")
    systems = [("saga", results.get("saga")), ("bare chain", results.get("bare_chain"))]
    if results.get("history"):
        systems.append((f"saga, {results['history']['sagas']:,} old", results["history"].get("saga")))
    for label, system in systems:
        if not system:
            continue
        for phase in ("saturation", "direct", "rate_20", "rate_half"):
            row = system.get(phase)
            if not row:
                continue
            lat = row["latency_ms"]
            name = {"saturation": "saturation", "direct": "no HTTP, saturation"}.get(phase) or f"at {row['rate']:g}/s"
            lines.append(
                f"{label:<22}{name:<18}{_fmt(row['sagas_per_s']):>9}{_fmt(lat['p50']):>9}{_fmt(lat['p95']):>9}"
                f"{_fmt(lat['p99']):>9}{_fmt(lat['max']):>9}"
            )
    ratios = results.get("ratios", {})
    if ratios:
        lines += ["", "ratios: " + ", ".join(f"{k} {v}" for k, v in ratios.items() if not k.endswith("_rounds"))]
    for number, f in enumerate(results.get("rounds") or [], start=1):
        lines.append(
            f"  round {number} ({f.get('first', 'saga')} first): "
            f"saga {f.get('saga_sagas_per_s')} vs bare {f.get('bare_sagas_per_s')} sagas/s "
            f"({f.get('saga_vs_bare_throughput')}, CPU per saga {f.get('cpu_per_saga_vs_bare')} x); without HTTP "
            f"{f.get('saga_without_http_sagas_per_s')} vs {f.get('bare_without_http_sagas_per_s')} "
            f"({f.get('saga_vs_bare_without_http_throughput')})"
        )
    saga = results.get("saga") or {}
    sat = saga.get("saturation")
    if sat:
        lines += ["", "saga at saturation, CPU cores used per process group:"]
        lines.append("  " + ", ".join(f"{k} {v:.2f}" for k, v in sat["cpu_cores"].items()))
        lines.append(f"  CPU per saga: {sat['cpu_ms_per_saga']} ms (all groups)")
        bare_sat = (results.get("bare_chain") or {}).get("saturation")
        if bare_sat:
            lines.append("bare chain at saturation, CPU cores used per process group:")
            lines.append("  " + ", ".join(f"{k} {v:.2f}" for k, v in bare_sat["cpu_cores"].items()))
            lines.append(f"  CPU per saga: {bare_sat['cpu_ms_per_saga']} ms (all groups)")
    for label, system in (("saga", saga), ("bare chain", results.get("bare_chain") or {})):
        for phase, how in (("saturation", "at saturation"), ("direct", "without HTTP")):
            row = system.get(phase) or {}
            work = row.get("work_per_saga")
            if not work:
                continue
            lines.append(
                f"{label} {how}, per saga: CPU {row['cpu_ms_per_saga']} ms, transactions "
                + _counts(work["transactions"])
            )
            if row.get("cpu_ms_per_saga_main_process"):
                lines.append(
                    "  of which each main process (a worker's consumer), ms: "
                    + ", ".join(f"{k} {v:.1f}" for k, v in row["cpu_ms_per_saga_main_process"].items())
                )
            if work.get("rows_written"):
                wal = work.get("wal")
                lines.append(
                    "  PostgreSQL rows written "
                    + _counts(work["rows_written"])
                    + (f"; WAL {wal['kb']} kB in {wal['records']} records" if wal else "")
                )
            if work.get("redis_commands"):
                lines.append("  Redis commands " + _counts(work["redis_commands"]))
    lines += same_rate_cpu(results)
    for phase in ("saturation", "rate_20", "rate_half"):
        steps = (saga.get(phase) or {}).get("steps")
        if not steps:
            continue
        lines.append(f"saga steps, {phase}: queue wait p50/p95 | work p50/p95 (ms)")
        for name, row in steps.items():
            w, k = row["queue_wait_ms"], row["work_ms"] or {}
            work = f"{_fmt(k['p50']):>8}{_fmt(k['p95']):>8}" if k else "  (the errback and the coordinator)"
            lines.append(f"  {name:<24}{_fmt(w['p50']):>8}{_fmt(w['p95']):>8} |{work}")
    by_outcome = [
        (label, row)
        for label, system in (("saga", saga), ("bare chain", results.get("bare_chain") or {}))
        for phase in ("rate_20", "rate_half")
        if (row := system.get(phase)) and row.get("latency_ms_by_outcome")
    ]
    if by_outcome:
        lines.append("latency by outcome, ms: p50/p95/p99 (orders)")
        for label, row in by_outcome:
            parts = [
                f"{outcome} {_fmt(lat['p50'])}/{_fmt(lat['p95'])}/{_fmt(lat['p99'])} ({lat['orders']})"
                for outcome, lat in row["latency_ms_by_outcome"].items()
            ]
            lines.append(f"  {label} at {row['rate']:g}/s: " + ", ".join(parts))
    for phase in ("rate_20", "rate_half"):
        row = saga.get(phase) or {}
        if row.get("slowest"):
            lines.append(f"saga at {row['rate']:g}/s, slowest orders: ms from the intended send, each step's wait/work")
            lines += ["  " + slow_order(order) for order in row["slowest"]]
    rss = saga.get("worker_rss_mb")
    if rss:
        lines.append("worker RSS MB (start -> end): " + ", ".join(
            f"{k} {v.get('start_mb')}->{v.get('end_mb')}" for k, v in rss.items() if k != "samples"
        ))  # fmt: skip
    lines.append("")
    return "\n".join(lines)


def slow_order(order: dict[str, Any]) -> str:
    """One slow order on a line: its latency and outcome, then each step's wait in its queue
    (from the step before it ended, or from the send for the first) and its work."""
    parts, before = [], 0.0
    for step in order["steps"]:
        started, finished = step.get("started_ms"), step.get("finished_ms")
        wait = None if started is None else started - before
        work = None if started is None or finished is None else finished - started
        parts.append(f"{step['step']} {_fmt(wait)}/{_fmt(work)}")
        before = finished if finished is not None else before
    return f"{_fmt(order['latency_ms'])} {order['outcome']}: " + ", ".join(parts)


# The Celery workers' process groups (one per queue, in both systems): a main process, the
# consumer, and its pool's processes, which run the tasks.
WORKERS = ("orders", "saga", "inventory", "payments", "notifications")


def same_rate_cpu(results: dict[str, Any]) -> list[str]:
    """CPU per saga by process group, saga against bare chain, in each phase both ran at the
    same rate, with each worker's pool and consumer (its main process) apart.

    At saturation each system runs at its own rate, and a worker's consumer costs less per
    message the more messages it takes a second (bench 2026-12-05: the bare chain's
    consumers 10.7 ms a saga at 26/s and 6.7 at 111/s): there the saga's consumers look
    dearer only for running at half the rate. At one rate the difference is the saga's own
    work."""
    lines: list[str] = []
    saga, bare = results.get("saga") or {}, results.get("bare_chain") or {}
    for phase in ("rate_half", "rate_20"):
        ours, theirs = saga.get(phase) or {}, bare.get(phase) or {}
        if not (ours.get("cpu_ms_per_saga_by_group") and theirs.get("cpu_ms_per_saga_by_group")):
            continue
        if not lines:
            lines += ["", "CPU per saga at the same rate, ms, saga / bare chain (a worker's pool and consumer apart):"]
        parts = []
        for group in sorted(set(ours["cpu_ms_per_saga_by_group"]) | set(theirs["cpu_ms_per_saga_by_group"])):
            split = [_pool_and_consumer(row, group) for row in (ours, theirs)]
            if group in WORKERS:
                parts.append(f"{group} pool {split[0][0]:.2f} / {split[1][0]:.2f}")
                parts.append(f"{group} consumer {split[0][1]:.2f} / {split[1][1]:.2f}")
            else:
                parts.append(f"{group} {sum(split[0]):.2f} / {sum(split[1]):.2f}")
        all_ours, all_theirs = ours["cpu_ms_per_saga"], theirs["cpu_ms_per_saga"]
        ratio = f" ({all_ours / all_theirs:.2f} x)" if all_theirs else ""  # no CPU counted: no ratio
        lines.append(f"  at {ours.get('rate', 0):g}/s: all {all_ours:.2f} / {all_theirs:.2f}{ratio}")
        lines.append("    " + ", ".join(parts))
    return lines


def _pool_and_consumer(row: dict[str, Any], group: str) -> tuple[float, float]:
    """(the group's CPU per saga but its main process's, its main process's)."""
    total = row["cpu_ms_per_saga_by_group"].get(group, 0.0)
    consumer = (row.get("cpu_ms_per_saga_main_process") or {}).get(group, 0.0)
    return total - consumer, consumer


def draw(results: dict[str, Any], path: Path) -> None:
    """Latency distributions (CDF per system and rate) and throughput (bars) in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8), gridspec_kw={"width_ratios": [3, 2]})
    styles = {"saga": "-", "bare_chain": "--", "history": ":"}
    for system in ("saga", "bare_chain", "history"):
        data = results.get(system) if system != "history" else (results.get("history") or {}).get("saga")
        for phase, color in (("rate_20", "tab:blue"), ("rate_half", "tab:orange")):
            row = (data or {}).get(phase)
            samples = (row or {}).get("latency_samples_ms")
            if not samples:
                continue
            xs = sorted(samples)
            ys = [(i + 1) / len(xs) for i in range(len(xs))]
            label = f"{system.replace('_', ' ')} at {row['rate']:g}/s (p99 {row['latency_ms']['p99']:.0f} ms)"
            left.plot(xs, ys, styles[system], color=color, label=label)
    left.set_xscale("log")
    left.set_xlabel("submit -> terminal state (ms, log scale)")
    left.set_ylabel("share of orders")
    left.set_title("Latency distribution")
    left.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=8, loc="lower right")

    bars = [
        ("floor\n(1 process)", results.get("floor_sagas_per_s")),
        ("bare\nchain", results.get("bare_chain_sagas_per_s")),
        ("saga", results.get("sagas_per_s")),
    ]
    if results.get("history"):
        bars.append(
            (
                f"saga, {results['history']['sagas'] // 1000}k\nold sagas",
                results["history"]["saga"]["saturation"]["sagas_per_s"],
            )
        )
    bars = [(k, v) for k, v in bars if v]
    right.bar(
        [k for k, _ in bars],
        [v for _, v in bars],
        color=["tab:gray", "tab:green", "tab:blue", "tab:purple"][: len(bars)],
    )
    for i, (_, v) in enumerate(bars):
        right.text(i, v, f"{v:.0f}", ha="center", va="bottom")
    right.set_ylabel("completed sagas per second")
    title = f"Throughput, {results.get('orders')} orders"
    rounds = (results.get("ratios") or {}).get("saga_vs_bare_throughput_rounds")
    if rounds:
        # The bars are the first round's; the run's ratio is the rounds' median (bench.run).
        median = results["ratios"]["saga_vs_bare_throughput"]
        title += f"\nbars: round 1; saga / bare, median of {len(rounds)} rounds: {median:g}"
    right.set_title(title)
    m = results.get("machine", {})
    fig.suptitle(f"make bench: {m.get('cores')} cores, PostgreSQL {m.get('postgresql')}, {m.get('broker')}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _counts(counts: dict[str, float]) -> str:
    total = counts.get("total")
    rest = ", ".join(f"{k} {v:g}" for k, v in counts.items() if k != "total")
    return f"{total:g} ({rest})"
