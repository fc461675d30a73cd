"""How the CLI shows things: consoles that use the whole width, help that shows defaults, the cache
in a few human figures, and `status --watch` cut to the terminal's height."""
from __future__ import annotations

import argparse
import os
from typing import Any, Callable

from rich.console import Console, Group
from rich.table import Table

WIDE = 200  # columns when the output is not a terminal (a pipe, a file, `make`): no 80-column cut


def console(stderr: bool = False) -> Console:
    """A rich Console on stdout (or stderr): the terminal's width on a terminal; WIDE columns when not
    one (rich would otherwise fold tables to 80), unless COLUMNS says otherwise."""
    c = Console(stderr=stderr)
    if not c.is_terminal and not os.environ.get("COLUMNS"):
        c = Console(stderr=stderr, width=WIDE)
    return c


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written, and each option's default after its help: `(default: 2.0)`.

    Not said when there is nothing to say: no default (None), a flag's False, or help that already
    speaks of its default (as options whose default comes from the environment do)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if text == argparse.SUPPRESS or "default" in text.lower():
            return action.help
        d = action.default
        if d is None or d is False or d == argparse.SUPPRESS or isinstance(action, (
                argparse._HelpAction, argparse._VersionAction, argparse._StoreConstAction)):
            return action.help
        if not action.option_strings and action.nargs not in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return action.help
        if isinstance(d, str) and d == "":
            return text + " (default: none)"
        return text + " (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose help shows defaults; its subcommands' parsers are of the same kind."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def env_help(text: str, var: str, fallback: Any) -> str:
    """Help for an option whose default comes from the environment variable var."""
    return f"{text} (env {var}; default: {fallback if fallback not in (None, '') else 'none'})"


def walk(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.ArgumentParser]]:
    """Every parser under parser, with its command line (`microswarm coordinator start`)."""
    found = [(parser.prog, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):  # (aliases map to the same parser)
                found += walk(sub)
    return found


def fill_help(parser: argparse.ArgumentParser, texts: dict[str, str]) -> None:
    """Give the arguments that have no help the text of their dest in texts, in every parser."""
    for _, p in walk(parser):
        for action in p._actions:
            if action.help is None and action.dest in texts:
                action.help = texts[action.dest]


# ---------------------------------------------------------------- the cache

def size(n: float | int | None) -> str:
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # (not reached)


def cache_summary(stats: dict[str, Any]) -> Table:
    """The result cache in a few figures, for `status` (`cache stats` has them all)."""
    t = Table(title="result cache (all figures: microswarm cache stats)", title_justify="left")
    for col in ("hit ratio", "entries", "memory", "evictions", "governor"):
        t.add_column(col)
    hits, misses = int(stats.get("hits") or 0), int(stats.get("misses") or 0)
    ratio = f"{100.0 * hits / (hits + misses):.1f} % ({hits} of {hits + misses})" if hits + misses else "- (no lookups)"
    memory = f"{size(stats.get('accounted_bytes') or 0)} cached"
    if stats.get("heap_bytes") is not None and stats.get("max_heap_bytes"):  # the budget: the governor's max heap
        memory += f"; heap {size(stats['heap_bytes'])} of {size(stats['max_heap_bytes'])}"
    evictions = f"{int(stats.get('evictions') or 0)} ({size(stats.get('evicted_bytes') or 0)})"
    if stats.get("max_heap_bytes") is None and "last_decision" not in stats:
        governor = "off"
    else:
        decision = str(stats.get("last_decision") or "ok")
        governor = {"ok": "[green]ok[/]", "critical": "[red]critical[/]"}.get(decision, f"[yellow]{decision}[/]")
    if stats.get("admitting") is False:
        governor += "\n[red]admits nothing new[/]"
    row = [ratio, str(int(stats.get("entries") or 0)), memory, evictions, governor]
    if "shared_url" in stats:  # --cache-url: the shared region on Redis behind this (near) cache
        t.add_column("shared (Redis)")
        up = "[green]up[/]" if stats.get("shared_up") else "[red]unreachable[/]"
        shared = f"{up}, write {stats.get('shared_write')}\n{stats.get('shared_hits', 0)} hits, " \
                 f"{stats.get('shared_writes', 0)} written"
        if stats.get("shared_write") == "behind":
            shared += f"\nqueue {stats.get('write_queue', 0)} of {stats.get('write_queue_limit', 0)}" \
                      f", {stats.get('write_dropped', 0)} dropped"
        row.append(shared)
    t.add_row(*row)
    return t


# ---------------------------------------------------------------- status --watch

def fit_height(build: Callable[[int | None], list[Any]], con: Console, calls: int) -> Group:
    """The status tables cut to the console's height: as many of the most recent calls as fit (build(n)
    makes the tables with n calls; None: all it has), never more lines than the console has."""
    height = con.size.height
    options = con.options

    def lines(n: int | None) -> tuple[int, list[Any]]:
        tables = build(n)
        return len(con.render_lines(Group(*tables), options, pad=False)), tables

    used, tables = lines(calls)
    if used <= height - 1:  # (one line for the cursor under the live display)
        return Group(*tables)
    base, tables = lines(0)
    n = max(0, min(calls, height - 1 - base))
    while n > 0:
        used, tables = lines(n)
        if used <= height - 1:
            break
        n -= max(1, used - (height - 1))  # rows that wrapped take more than a line each
    else:
        used, tables = lines(0)
    if used > height - 1:  # even without calls it is too tall: crop (the tables' tops stay)
        from rich.text import Text
        rendered = con.render_lines(Group(*tables), options, pad=False)[:max(0, height - 2)]
        out = Text()
        for line in rendered:
            for seg in line:
                out.append(seg.text, seg.style)
            out.append("\n")
        out.append("… (more than the terminal shows: make it taller, or run `microswarm status`)", style="dim")
        return Group(out)
    return Group(*tables)
