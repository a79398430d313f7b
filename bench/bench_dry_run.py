"""Dry run of the injector's argv next to starting Python (and importing click), in one run.

    .venv/bin/python bench/bench_dry_run.py
"""

from __future__ import annotations

from common import CLI, INJECTOR_ARGV, PYTHON, row, time_command


def main() -> None:
    # Warm the page cache so the first sample does not pay for disk reads.
    time_command([*CLI, "--dry-run", *INJECTOR_ARGV], runs=2)
    bare = time_command([PYTHON, "-I", "-c", "pass"])
    click = time_command([PYTHON, "-I", "-c", "import click"])
    dry_run = time_command([*CLI, "--dry-run", *INJECTOR_ARGV])
    print(row("python -I -c pass", bare, bare, "python"))
    print(row("python -I -c 'import click'", click, bare, "python"))
    print(row("istio-iptables --dry-run <injector argv>", dry_run, bare, "python"))
    print(row("istio-iptables --dry-run <injector argv>", dry_run, click, "import click"))


if __name__ == "__main__":
    main()
