"""``lineinspect forget-line``: list a retired line's Redis keys (a shadow line's after a replay) and remove them.

Nothing expires a line's streams, its model key or its trimmed-unread hash. Forgetting is refused while a worker of
the line beats (it would write the keys again and lose what it holds; ``force``) and while frames have no decision
yet (``discard_undecided``); ``keep_deadletters`` keeps the dead-letter stream. Both checks run again after the
question, which may wait a while. Which keys are the line's, and their sizes, is ``StreamClient.line_footprint``'s
business (SCAN, never KEYS; names another line could also own are left to expire).
"""

from __future__ import annotations

import sys
import time

from pipeline.streams import UNLINK_BATCH, KeyUsage, LineFootprint, LineKeys, StreamClient, StreamsUnavailable

_ITEMS = {"stream": "entries", "hash": "fields", "zset": "members", "string": "bytes"}


def forget_line(
    client: StreamClient,
    keys: LineKeys,
    retry_s: float,
    *,
    dry_run: bool,
    yes: bool,
    force: bool,
    discard_undecided: bool,
    keep_deadletters: bool,
) -> int:
    """The command's exit code: 0 removed, nothing to remove or a dry run; 1 declined. A refusal raises ValueError
    (exit 2), Redis lost part-way StreamsUnavailable naming how many keys were removed (exit 1)."""
    footprint, refusals = _plan(client, keys, force, discard_undecided)
    print("\n".join(_listing(keys, footprint, keep_deadletters)))
    if dry_run:
        for refusal in refusals:
            print(f"lineinspect forget-line: warning: would refuse: {refusal}", file=sys.stderr)
        return 0
    if refusals:
        raise ValueError("; ".join(refusals))
    if not _removable(keys, footprint, keep_deadletters):
        print("nothing to remove")
        return 0
    if not yes and not _confirmed(f"remove these keys of line {keys.line_id!r}? [y/N] "):
        print("nothing removed")
        return 1
    client.retry_deadline = time.monotonic() + retry_s  # counted from the answer
    footprint, refusals = _plan(client, keys, force, discard_undecided)
    if refusals:
        raise ValueError("; ".join(refusals))
    removed = _unlink(client, keys, _removable(keys, footprint, keep_deadletters))
    print(f"removed {removed} keys of line {keys.line_id!r}")
    return 0


def _unlink(client: StreamClient, keys: LineKeys, names: list[str]) -> int:
    """``client.unlink`` a batch at a time, so that Redis lost part-way is reported with what was removed before
    (the line is then half forgotten, and another run removes the rest)."""
    removed = done = 0
    try:
        for start in range(0, len(names), UNLINK_BATCH):
            batch = names[start : start + UNLINK_BATCH]
            removed += client.unlink(batch)
            done += len(batch)
    except StreamsUnavailable as error:
        msg = (f"{error}; {done} of the {len(names)} keys of line {keys.line_id!r} were removed before, the others "
               "are still there: run forget-line again once Redis answers to remove them")  # fmt: skip
        raise StreamsUnavailable(msg) from error
    return removed


def _plan(
    client: StreamClient, keys: LineKeys, force: bool, discard_undecided: bool
) -> tuple[LineFootprint, list[str]]:
    """The line's footprint, and why forgetting it now is refused (empty: it is not)."""
    workers = [
        status
        for status in client.read_health(keys.prefix)
        if status.get("line") == keys.line_id and status.get("state") != "stopped"
    ]
    footprint = client.line_footprint(keys)
    refusals = []
    if workers and not force:
        named = ", ".join(
            f"{status.get('role')} {status.get('name')} (host {status.get('host')}, pid {status.get('pid')}, "
            f"{status.get('state')})"
            for status in workers
        )
        refusals.append(
            f"line {keys.line_id!r} has workers running (fresh heartbeats): {named}; stop them first (a running "
            "worker writes the line's keys again and loses the frames it holds), or --force"
        )
    if footprint.undecided and not discard_undecided:
        unread = "some" if footprint.frames_unread is None else footprint.frames_unread
        refusals.append(
            f"frames of line {keys.line_id!r} have no decision yet: {footprint.frames_pending} pending on scorers, "
            f"{unread} not yet read by any, {footprint.results_waiting} scored and waiting for the sink; run the "
            "line's scorer and sink until they are decided, or --discard-undecided"
        )
    return footprint, refusals


def _removable(keys: LineKeys, footprint: LineFootprint, keep_deadletters: bool) -> list[str]:
    return [usage.key for usage in footprint.keys if not (keep_deadletters and usage.key == keys.deadletter)]


def _listing(keys: LineKeys, footprint: LineFootprint, keep_deadletters: bool) -> list[str]:
    """One line per key; published markers and commit replies (many keys, expiring) summed per kind. The total is
    what would be removed (a kept dead-letter stream is listed, not counted)."""
    rows: dict[str, list[KeyUsage]] = {}
    for usage in footprint.keys:
        name = usage.key
        for many in (keys.published(""), f"{keys.deadletter}:commit:"):
            if name.startswith(many):
                name = f"{many}* (expiring)"
        if keep_deadletters and name == keys.deadletter:
            name = f"{name} (kept: --keep-deadletters)"
        rows.setdefault(name, []).append(usage)
    removable = set(_removable(keys, footprint, keep_deadletters))
    counted = [usage for usage in footprint.keys if usage.key in removable]
    lines = [f"line {keys.line_id!r} (prefix {keys.prefix!r}): {len(counted)} keys to remove, {_size(counted)}"]
    width = max(map(len, rows), default=0)
    for name, usages in rows.items():
        count = f"{len(usages)} keys, " if name.endswith("* (expiring)") else ""
        kind, items = usages[0].kind, sum(usage.items for usage in usages)
        lines.append(f"  {kind:<6}  {name:<{width}}  {count}{items} {_ITEMS[kind]}, {_size(usages)}")
    if footprint.left_alone:
        lines.append(
            f"  left alone: {len(footprint.left_alone)} keys that another line's names also give (ids may hold colons),"
            f" e.g. {footprint.left_alone[0]!r}"
        )
    return lines


def _size(usages: list[KeyUsage]) -> str:
    """The keys' MEMORY USAGE summed, in kB or MB."""
    if any(usage.memory_bytes is None for usage in usages):
        return "memory unknown"
    total = sum(usage.memory_bytes or 0 for usage in usages)
    return f"{total / 1e6:.1f} MB" if total >= 1e5 else f"{total / 1e3:.1f} kB"


def _confirmed(question: str) -> bool:
    try:
        return input(question).strip().lower() in ("y", "yes")
    except EOFError:  # no terminal and nothing piped: no
        return False
