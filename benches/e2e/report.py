"""The report of a run, made from its JSON document alone (as written by
``--json`` and loaded back): the harness prints it, and the docs' performance
page renders ``docs/performance/e2e.json`` with it. Pure: standard library
only, nothing runs at import.

    from benches.e2e.report import render_markdown
    markdown = render_markdown(json.loads(Path("docs/performance/e2e.json").read_text()))
"""

from __future__ import annotations

import shlex
import textwrap
from collections.abc import Iterator
from typing import Any

Section = dict[str, Any]


def render_markdown(data: dict[str, Any]) -> str:
    """The conditions of the run, its tables, every run's rates and the failures."""
    results = data["results"]
    lines = conditions_lines(data["conditions"])
    for name, table in (
        ("throughput", throughput_table),
        ("starttls", starttls_table),
        ("throughput", cpu_table),
        ("throughput", cpu_ratio_table),
        ("throughput", hooks_table),
        ("forwarding", forwarding_table),
        ("shared_limits", shared_limits_table),
        ("idle_memory", idle_memory_table),
        ("durable", durable_table),
        ("body_memory", body_memory_table),
        ("authentication", authentication_table),
    ):
        if name in results:
            lines += ["", *table(data)]
    lines += ["", "Runs:", "", *run_details(results)]
    problems = failures(results)
    if problems:
        lines += ["", "Failures:", "", *problems]
    return "\n".join(lines) + "\n"


def conditions_lines(conditions: Section) -> list[str]:
    machine, versions, settings = (conditions[key] for key in ("machine", "versions", "settings"))
    load = ", ".join(f"{value:.2f}" for value in machine["load_average_before"])
    runs = f"{settings['repeat']} timed run(s) per cell"
    if not settings["quick"]:
        runs += f" of about {settings['seconds']:g} s after a warm-up"
    skipped = ", ".join(settings["skipped"]) or "none"
    return [
        f"- Date: {conditions['date']}",
        f"- Machine: {machine['nproc']} CPUs ({machine['cpu']}), Linux {machine['kernel']}; "
        f"load average {load} and CPUs {machine['cpu_busy_before_percent']:.0f}% busy "
        "before the run; Maildir on " + machine["maildir_filesystem"],
        f"- Versions: kumo_listener {versions['kumo_listener']}, aiosmtpd {versions['aiosmtpd']}, "
        f"Postfix {versions['postfix']}, Python {versions['python']}",
        f"- Command: `{shlex.join(conditions['command'])}`",
        f"- Load: smtp-source, {settings['sessions']} parallel sessions, {runs}"
        + authentication_load(settings)
        + ("; quick (smoke) mode, the numbers mean little" if settings["quick"] else ""),
        f"- Measurements skipped: {skipped}",
    ]


def authentication_load(settings: Section) -> str:
    """The authentication section's own load generator, when it was measured."""
    if "authentication" in settings["skipped"]:
        return ""
    sessions = min(settings["sessions"], 10)
    return f" (authentication: benches/auth_load.py, smtplib, {sessions} parallel sessions)"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table, the first column left-aligned and the others right-aligned."""
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def rate_cell(value: float | None) -> str:
    return "FAILED" if value is None else f"{value:,.0f}"


def ratio_cell(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def mib_cell(kib: float | None) -> str:
    return "n/a" if kib is None else f"{kib / 1024:,.1f}"


def cpu_of(item: Section | None) -> list[float] | None:
    """[server, load generator] CPU µs per message or per session."""
    if item is None:
        return None
    return item.get("cpu_us_per_msg_server_client") or item.get("cpu_us_per_session_server_client")


def cpu_cell(item: Section | None) -> str:
    cpu = cpu_of(item)
    return "n/a" if cpu is None else f"{cpu[0]:,.0f} / {cpu[1]:,.0f}"


def median(section: Section, server: str) -> float | None:
    item = section["servers"].get(server)
    return None if item is None else item["msgs_per_s_median"]


def server_titles(shapes: Section) -> dict[str, str]:
    """Server key → title, in the order of the first shape's columns."""
    first: Section = next(iter(shapes.values()), {"servers": {}})
    return {key: item["title"] for key, item in first["servers"].items()}


def throughput_table(data: dict[str, Any]) -> list[str]:
    shapes = data["results"]["throughput"]
    titles = server_titles(shapes)
    header = ["shape (msgs/s, median)", *titles.values(), "kumo/smtp-sink", "kumo/aiosmtpd"]
    return table(header, rate_rows(shapes, titles, "kumo_discard", ("smtp_sink", "aiosmtpd")))


def rate_rows(
    shapes: Section, titles: dict[str, str], over: str, unders: tuple[str, ...]
) -> list[list[str]]:
    """Per shape: each server's median rate, then that of ``over`` against each of ``unders``."""
    rows = []
    for shape in shapes.values():
        top = median(shape, over)
        rates = [rate_cell(median(shape, key)) for key in titles]
        ratios = [ratio_cell(ratio(top, median(shape, key))) for key in unders]
        rows.append([shape["title"], *rates, *ratios])
    return rows


HOOK_COLUMNS = {"kumo_observed": "inline", "kumo_def_hooks": "def", "kumo_seed": "seed"}


def hooks_table(data: dict[str, Any]) -> list[str]:
    """The policy's hooks as written (INFO logs, metrics): memoized and
    ``@kumo.inline``, the same as plain ``def``, and the seed's example
    (plain ``def``, ``toml_load`` per connection): server CPU per message
    against smtp-sink's, and plain ``def``'s rate against smtp-sink's."""
    header = ["hooks at INFO: server CPU µs per message (median)", *HOOK_COLUMNS.values()]
    header += ["smtp-sink", "def/sink (≤ 1.1x)", "inline/sink (≤ 1.0x)", "seed/inline (≤ 1.15x)"]
    header += ["def rate/sink (≥ 1.0x)"]
    rows = []
    for shape in data["results"]["throughput"].values():
        cpu = {key: cpu_of(shape["servers"].get(key)) for key in (*HOOK_COLUMNS, "smtp_sink")}
        server = {key: None if value is None else value[0] for key, value in cpu.items()}
        cells = [rate_cell(server[key]) for key in (*HOOK_COLUMNS, "smtp_sink")]
        cells += [
            ratio_cell(ratio(server["kumo_def_hooks"], server["smtp_sink"])),
            ratio_cell(ratio(server["kumo_observed"], server["smtp_sink"])),
            ratio_cell(ratio(server["kumo_seed"], server["kumo_observed"])),
            ratio_cell(ratio(median(shape, "kumo_def_hooks"), median(shape, "smtp_sink"))),
        ]
        rows.append([shape["title"], *cells])
    return table(header, rows)


def starttls_table(data: dict[str, Any]) -> list[str]:
    servers = data["results"]["starttls"]
    medians = [item["sessions_per_s_median"] for item in servers.values()]
    protocols = sorted({name for item in servers.values() for name in item["protocols"]})
    header = ["STARTTLS sessions/s (median)", *(item["title"] for item in servers.values())]
    cells = [rate_cell(value) for value in medians]
    if len(medians) == 2:
        header.append("kumo/aiosmtpd")
        cells.append(ratio_cell(ratio(*medians)))
    label = f"full handshake, EHLO, QUIT ({', '.join(protocols) or 'n/a'})"
    return table(header, [[label, *cells]])


def cpu_table(data: dict[str, Any]) -> list[str]:
    """Where the time goes: when the load generator's CPU per message nears a
    core's worth at the measured rate, it, not the server, sets the pace."""
    shapes = data["results"]["throughput"]
    titles = server_titles(shapes)
    header = ["CPU µs per message (median): server / load generator", *titles.values()]
    rows = [
        [shape["title"], *(cpu_cell(shape["servers"].get(key)) for key in titles)]
        for shape in shapes.values()
    ]
    starttls = data["results"].get("starttls")
    if starttls is not None:
        rows.append(
            ["STARTTLS session (per session)", *(cpu_cell(starttls.get(key)) for key in titles)]
        )
    return table(header, rows)


def cpu_ratio_table(data: dict[str, Any]) -> list[str]:
    """Server CPU per message against smtp-sink's, which does nothing."""
    shapes = data["results"]["throughput"]
    titles = server_titles(shapes)
    kumo = [key for key in ("kumo_discard", "kumo_observed") if key in titles]
    header = ["server CPU per message over smtp-sink's (median)", *(titles[key] for key in kumo)]
    rows = []
    for shape in shapes.values():
        sink = cpu_of(shape["servers"].get("smtp_sink"))
        cells = []
        for key in kumo:
            cpu = cpu_of(shape["servers"][key])
            cells.append(
                ratio_cell(None if cpu is None or sink is None else ratio(cpu[0], sink[0]))
            )
        rows.append([shape["title"], *cells])
    return table(header, rows)


# Server CPU per message, forwarding: (numerator, denominator, column title).
FORWARDING_CPU_RATIOS = (
    ("kumo_forward", "kumo_discard", "kumo forward/kumo discard (target ≤ 2x)"),
    ("kumo_forward_observed", "kumo_discard", "kumo forward at INFO/kumo discard"),
    ("postfix_proxy", "kumo_forward", "Postfix proxy/kumo forward"),
    ("aiosmtpd_proxy", "kumo_forward", "aiosmtpd Proxy/kumo forward"),
)


def forwarding_table(data: dict[str, Any]) -> list[str]:
    """Forwarding to one smtp-sink: the rates with kumo_listener's against
    Postfix's before-queue proxy and aiosmtpd's Proxy, then the server CPU per
    message, kumo_listener forwarding against kumo_listener discarding and the
    other forwarders against kumo_listener."""
    shapes = data["results"]["forwarding"]
    titles = server_titles(shapes)
    level = data["conditions"]["settings"]["kumo_log_level"]
    header = ["forwarding to one smtp-sink (msgs/s, median)", *titles.values()]
    header += ["kumo/Postfix proxy (target ≥ 3x)", "kumo/aiosmtpd Proxy (target ≥ 10x)"]
    rates = rate_rows(shapes, titles, "kumo_forward", ("postfix_proxy", "aiosmtpd_proxy"))
    ratios = [entry for entry in FORWARDING_CPU_RATIOS if entry[0] in titles and entry[1] in titles]
    cpu_header = ["forwarding: CPU µs per message (median), server / load generator"]
    cpu_header += [*titles.values(), *(f"server CPU, {title}" for _, _, title in ratios)]
    cpu_rows = []
    for shape in shapes.values():
        servers = shape["servers"]
        cells = [cpu_cell(servers.get(key)) for key in titles]
        for over, under, _ in ratios:
            top, bottom = cpu_of(servers.get(over)), cpu_of(servers.get(under))
            value = None if top is None or bottom is None else ratio(top[0], bottom[0])
            cells.append(ratio_cell(value))
        cpu_rows.append([shape["title"], *cells])
    note = (
        f"Forwarding: kumo_listener (forward_to) at --log-level {level}, the INFO row with "
        "metrics served too; the benchmark policy in all kumo_listener rows. Server CPU: "
        "the server's process tree (Postfix: master, smtpd and every other child), never "
        "the sink's; the sink's own column is the sink sent to directly."
    )
    return [note, "", *table(header, rates), "", *table(cpu_header, cpu_rows)]


def shared_limits_table(data: dict[str, Any]) -> list[str]:
    """The per-client limits counted in Redis against per process: rates, CPU
    per message and their ratios, then Redis's calls per connection and message."""
    shapes = data["results"]["shared_limits"]
    titles = server_titles(shapes)
    header = [
        "shared limits (msgs/s, median)",
        *titles.values(),
        "Redis/per process (target ≥ 0.9x)",
    ]
    rates = rate_rows(shapes, titles, "kumo_limits_redis", ("kumo_limits_local",))
    cpu_header = ["shared limits: CPU µs per message (median), server / load generator"]
    cpu_header += [*titles.values(), "server CPU, Redis/per process (target ≤ 1.15x)"]
    cpu_rows = []
    notes = []
    for shape in shapes.values():
        servers = shape["servers"]
        top, bottom = (
            cpu_of(servers.get("kumo_limits_redis")),
            cpu_of(servers.get("kumo_limits_local")),
        )
        value = None if top is None or bottom is None else ratio(top[0], bottom[0])
        cells = [cpu_cell(servers.get(key)) for key in titles]
        cpu_rows.append([shape["title"], *cells, ratio_cell(value)])
        notes.append(round_trips_line(shape.get("redis_round_trips") or {}))
    note = (
        "Shared limits: max_connections_per_client, max_connection_rate_per_client and "
        "max_message_rate_per_client set (never reached; relay_hosts empty, since its clients "
        "are exempt), counted per process or in a Redis on loopback (--redis). Server CPU: the "
        "listener's process, not Redis's."
    )
    return [note, "", *table(header, rates), "", *table(cpu_header, cpu_rows), "", *notes]


def round_trips_line(trips: Section) -> str:
    if not trips or trips.get("error"):
        return f"Redis round trips: not counted ({trips.get('error') or 'no data'})."
    commands = ", ".join(name.upper() for name in trips["commands"])
    return (
        f"Redis round trips ({commands}, from INFO commandstats around a counted run of each "
        f"shape): {trips['per_connection']:.2f} per connection, {trips['per_message']:.2f} "
        "per message."
    )


def authentication_table(data: dict[str, Any]) -> list[str]:
    """Authentication annotated (every method) against off: rates, then the
    server CPU per message and its ratio."""
    shapes = data["results"]["authentication"]
    titles = server_titles(shapes)
    header = ["authentication (msgs/s, median)", *titles.values()]
    rates = rate_rows(shapes, titles, "kumo_authentication", ())
    cpu_header = ["authentication: CPU µs per message (median), server / load generator"]
    cpu_header += [*titles.values(), "server CPU, annotate/off (target 1 KB ≤ 1.5x)"]
    cpu_rows = []
    for shape in shapes.values():
        servers = shape["servers"]
        cells = [cpu_cell(servers.get(key)) for key in titles]
        top, bottom = (
            cpu_of(servers.get("kumo_authentication")),
            cpu_of(servers.get("kumo_discard")),
        )
        cells.append(
            ratio_cell(None if top is None or bottom is None else ratio(top[0], bottom[0]))
        )
        cpu_rows.append([shape["title"], *cells])
    note = (
        "Authentication: SPF, DKIM, DMARC, ARC and iprev annotated, warm DNS cache (a dnslib "
        "server on loopback), one RSA-2048 signature by dkimpy; the load generator is "
        "benches/auth_load.py (smtplib), not smtp-source."
    )
    return [note, "", *table(header, rates), "", *table(cpu_header, cpu_rows)]


def idle_memory_table(data: dict[str, Any]) -> list[str]:
    idle = data["conditions"]["settings"]["idle_connections"]
    header = ["server", "RSS before (MiB)", f"RSS, {idle} idle connections (MiB)"]
    rows = []
    for item in data["results"]["idle_memory"].values():
        if item["error"]:
            rows.append([item["title"], "FAILED", "FAILED", "FAILED"])
            continue
        rss = [mib_cell(item["rss_before_kib"]), mib_cell(item["rss_after_kib"])]
        rows.append([item["title"], *rss, f"{item['kib_per_connection']:.1f}"])
    return table([*header, "KiB/connection"], rows)


def durable_table(data: dict[str, Any]) -> list[str]:
    shapes = data["results"]["durable"]
    titles = server_titles(shapes)
    sessions = data["conditions"]["settings"]["durable_sessions"]
    header = [f"durable, {sessions} sessions (msgs/s, median)", *titles.values()]
    header += ["maildir/discard", "maildir/Postfix queue"]
    rows = rate_rows(shapes, titles, "kumo_maildir", ("kumo_discard", "postfix_queue"))
    for shape in shapes.values():
        label = f"CPU µs per message, server / load generator: {shape['title']}"
        rows.append([label, *(cpu_cell(shape["servers"][key]) for key in titles), "", ""])
    return table(header, rows)


def body_memory_table(data: dict[str, Any]) -> list[str]:
    settings = data["conditions"]["settings"]
    header = [
        f"{settings['memory_sessions']} sessions, {settings['memory_megabytes']} MB each over "
        f"{settings['memory_seconds']:g} s (MiB)",
        "before",
        "more, before the final dots",
        "more, peak (sampled)",
        "more, VmHWM",
    ]
    rows = []
    for item in data["results"]["body_memory"].values():
        if item["error"]:
            rows.append([item["title"], "FAILED", "FAILED", "FAILED", "FAILED"])
            continue
        baseline = item["baseline_kib"]
        rows.append(
            [
                item["title"],
                mib_cell(baseline),
                mib_cell(item["at_pause_kib"] - baseline),
                mib_cell(item["peak_kib"] - baseline),
                mib_cell(item["hwm_growth_kib"]),
            ]
        )
    note = (
        "Memory: the sum of the Pss of the server's processes (Postfix: master and every "
        "child, smtpd and cleanup included); VmHWM for single processes."
    )
    return [note, "", *table(header, rows)]


def measurements(results: dict[str, Any]) -> Iterator[tuple[str, Section]]:
    """Every measured item with a label naming it: (label, its JSON)."""
    shaped = (
        ("throughput", ""),
        ("forwarding", "forwarding, "),
        ("shared_limits", "shared limits, "),
        ("durable", "durable, "),
        ("authentication", "authentication, "),
    )
    for name, prefix in shaped:
        for shape in results.get(name, {}).values():
            for item in shape["servers"].values():
                yield f"{prefix}{item['title']}, {shape['title']}", item
    for name, suffix in (
        ("starttls", "STARTTLS"),
        ("idle_memory", "idle connections"),
        ("body_memory", "slow sessions with big messages"),
    ):
        for item in results.get(name, {}).values():
            yield f"{item['title']}, {suffix}", item


def run_details(results: dict[str, Any]) -> list[str]:
    """The rate of every timed run, and the messages sent in each."""
    lines = []
    for label, item in measurements(results):
        rates = item.get("msgs_per_s_runs") or item.get("sessions_per_s_runs")
        if rates:
            per_run = item.get("messages_per_run")
            count = f"{per_run} msgs/run; " if per_run else ""
            unit = "msgs/s" if per_run else "sessions/s"
            runs = ", ".join(f"{rate:,.0f}" for rate in rates)
            lines.append(f"- {label}: {count}{runs} {unit}")
    return lines


def failures(results: dict[str, Any]) -> list[str]:
    """One Markdown list item per failure; an error seen before is named, not repeated."""
    found: list[str] = []
    first_seen: dict[str, str] = {}
    for label, item in measurements(results):
        error = item["error"]
        if not error:
            continue
        if error in first_seen:
            found.append(f"- {label}: the same failure as {first_seen[error]}")
            continue
        first_seen[error] = label
        found.append(f"- {label}:\n\n" + textwrap.indent(error, "      ") + "\n")
    return found
