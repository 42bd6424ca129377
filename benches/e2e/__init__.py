"""End-to-end benchmark: kumo_listener against aiosmtpd and Postfix's smtp-sink.

The package: ``__main__`` (the command line and the run), ``servers`` (kumo_listener,
aiosmtpd, smtp-sink), ``postfix`` (the private Postfix), ``processes`` (a server's
process tree), ``prerequisites`` (tools, certificates), ``conditions`` (what a run
was measured on), one module per measurement (``throughput``, ``forwarding``,
``shared_limits``, ``starttls``, ``idle_memory``, ``durable``, ``body_memory``), and
``report``: the Markdown report made from the JSON document alone
(``render_markdown``), which the docs' performance page renders from
``docs/performance/e2e.json``. Importing any of them starts nothing.

Usage::

    bash tools/install-bench-deps.sh            # once: what the harness runs against
    python3 -m benches.e2e                      # full run (about 15 minutes), from the repo root
    python3 -m benches.e2e --quick              # smoke run: tiny counts, one repetition
    python3 -m benches.e2e --json out.json      # also write the results as JSON
    python3 -m benches.e2e --skip starttls      # leave a measurement out (repeatable)

Options: ``--sessions`` (parallel smtp-source sessions, 50), ``--repeat`` (timed
runs per cell, 3), ``--seconds`` (target length of a run, 3), ``--idle`` (idle
connections, 5000), ``--kumo-log-level`` (WARNING), ``--durable-sessions`` (50),
``--memory-sessions`` (50), ``--memory-megabytes`` (5), ``--memory-seconds`` (4).

Each server runs as its own process on a free 127.0.0.1 port, one after the other:

- kumo_listener, ``python3 -m kumo_listener serve --policy benches/policy_bench.py``
  with ``--sink discard``, then with ``--sink maildir`` (fsync'd delivery into a
  temporary directory);
- aiosmtpd, ``python3 benches/aiosmtpd_server.py PORT COUNT_FILE --tls CERT KEY``
  (count, ``250 OK``);
- Postfix's ``smtp-sink`` (discards everything).

Postfix's ``smtp-source`` drives each in three shapes: a new connection per 1 KB
message, reused connections with 1 KB messages, and reused connections with
100 KB messages. Outside ``--quick``, a warm-up run calibrates the message count
so that a run lasts about ``--seconds``; then ``--repeat`` runs are timed and the
median is reported. A run fails (and is reported as failed, not as a number) when
smtp-source exits non-zero or writes to stderr, when the server's message counter
(or, for Maildir, the number of delivered files) differs from the number sent, or
when the server logs an error meanwhile. Delivered Maildir files are kept until
that server stops (deleting them between runs slows the next runs' fsyncs down),
unless the disk runs short.

Forwarding to one upstream, Postfix's ``smtp-sink`` (started once, ``-c``: it
prints a running count of the messages it got): kumo_listener with ``forward_to``
(the benchmark policy with ``KUMO_BENCH_FORWARD_TO``; at ``--kumo-log-level``, and
at INFO with metrics), Postfix's before-queue proxy (the private Postfix's smtpd
with ``-o smtpd_proxy_filter=127.0.0.1:SINK``: a connection to the sink per
message, no queue) and aiosmtpd's ``Proxy`` handler (``aiosmtpd_server.py
--proxy``), with kumo_listener (discard) and the sink itself sent to directly,
all running at once, their timed runs taking turns; reused connections and a new
connection per message, 1 KB. A run counts when, besides the checks above, the
sink's count grew by the number sent. The table gives kumo_listener's rate over
Postfix's proxy and over aiosmtpd's Proxy, and its server CPU per message over
kumo_listener discarding.

Then the resident memory per idle connection of kumo_listener (discard) and
aiosmtpd: RSS of a fresh server process before and after opening ``--idle``
connections that have read their banner.

Durable delivery: kumo_listener (discard), kumo_listener (maildir) and a private
Postfix with its queue (``postfix -c DIR start``, its own ``queue_directory`` under
/var/tmp, ``default_transport = discard``: cleanup fsyncs each message into the
queue before smtpd's 250) run at the same time, with ``--durable-sessions``
smtp-source sessions, a new connection per 1 KB message and reused connections;
their timed runs take turns. The table gives Maildir/discard and Maildir/Postfix.
A Postfix run counts when its log has a ``status=sent`` line per message sent.
Server CPU is that of the server's process tree, with the CPU of the children
it has reaped (``/proc/PID/stat`` utime, stime, cutime, cstime): for Postfix,
master, smtpd, cleanup, qmgr, the discard transport and the rest.

Memory with big bodies: ``--memory-sessions`` clients each send a message of
``--memory-megabytes`` over ``--memory-seconds`` and wait before the final dot;
kumo_listener (maildir), aiosmtpd and the Postfix queue. Memory is the sum of the
Pss (``/proc/PID/smaps_rollup``) of the server's process tree: before, at the
pause, and the highest of samples every 0.1 s; for single processes also VmHWM
(reset through ``clear_refs``) minus VmRSS before.

The harness installs nothing: ``tools/install-bench-deps.sh`` installs the Debian
package ``postfix`` (configured as "No configuration", so no mail system is set
up; its ports are never used), the PyPI packages ``aiosmtpd`` and
``cryptography``, and builds ``benches/starttls-load``; the harness checks for
them first and names that script when one is missing. It raises its own open-file
limit, which the server processes inherit. All processes it starts run in their
own process group and are killed on exit, errors and Ctrl-C. The exit status is
1 when anything failed.

STARTTLS: the Rust load client ``benches/starttls-load``
runs sessions of banner, EHLO, STARTTLS, a full TLS handshake (no resumption),
EHLO, QUIT, ``--sessions`` at a time on one thread. kumo_listener listens on
every address and its dynamic hook gives 127.0.0.1 and 127.0.0.2 each its own
certificate (the client checks that each address presented its own); aiosmtpd
has one ``ssl`` context. The certificates are ECDSA P-256, made by the harness
with ``cryptography``.

kumo_listener runs with ``--log-level WARNING`` (``--kumo-log-level``): at the
default INFO it logs a line per message, as aiosmtpd does at INFO, which neither
does here.
"""
