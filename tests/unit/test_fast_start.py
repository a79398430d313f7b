"""Fast start: what the CLI's speed-ups must not change (parsing, records, address detection)."""

from __future__ import annotations

import ast
import dataclasses
import ipaddress
import random
import shlex
import sys

import click
import pytest

from istio_iptables._lib.records import factory, record
from istio_iptables.frontends.cli.main import command, spell_out_short_options
from istio_iptables.xtables.model import Address, Ports, Rule, RuleSet

# Short and long options, values that look like options, attached values, "--", strays.
TOKENS = [
    *shlex.split("-p -z -u -m -i -x -b -d -n -f -k -c -q -o -t -r -g -e -h -"),
    *shlex.split("--envoy-port --dry-run --resolv-conf --log_as_json --enable-ipv6 --disable-ipv6"),
    *shlex.split("--version --help --"),
    *shlex.split("* 15001 true -p15001 --envoy-port=1 -n=true -xy --nope"),
    "",
]


def parse(args: list[str]) -> object:
    try:
        return command.make_context("istio-iptables", list(args), resilient_parsing=False).params
    except click.exceptions.Exit as done:
        return ("exit", done.exit_code)
    except click.ClickException as error:
        return ("error", type(error).__name__)


def test_spelling_out_short_options_never_changes_the_parse(capsys: pytest.CaptureFixture[str]) -> None:
    generator = random.Random(7)
    for _ in range(600):
        args = [generator.choice(TOKENS) for _ in range(generator.randrange(0, 7))]
        assert parse(spell_out_short_options(args)) == parse(args), args
    capsys.readouterr()


def test_the_injector_argv_is_spelled_out_in_full() -> None:
    args = shlex.split("-p 15001 -z 15006 -u 1337 -m REDIRECT -i * -x '' -b * -d 15090,15021,15020")
    spelled = spell_out_short_options(args)
    assert spelled[::2] == [
        "--envoy-port",
        "--inbound-capture-port",
        "--proxy-uid",
        "--istio-inbound-interception-mode",
        "--istio-service-cidr",
        "--istio-service-exclude-cidr",
        "--istio-inbound-ports",
        "--istio-local-exclude-ports",
    ]
    assert spelled[1::2] == args[1::2]


@record
class Point:
    x: int
    y: int = 0
    tags: tuple[str, ...] = ()


def test_records_behave_like_frozen_dataclasses() -> None:
    point = Point(1)
    assert point == Point(1, 0, ()) == Point(x=1) and point != Point(2) and point != (1, 0, ())
    assert hash(point) == hash(Point(1)) and len({point, Point(1), Point(1, 2)}) == 2
    assert repr(point) == "Point(x=1, y=0, tags=())"
    assert dataclasses.replace(point, y=5) == Point(1, 5)
    assert dataclasses.asdict(Point(1, 2)) == {"x": 1, "y": 2, "tags": ()}
    assert [field.name for field in dataclasses.fields(Point)] == ["x", "y", "tags"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        point.x = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        Point()  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        Point(1, x=2)  # type: ignore[misc]
    with pytest.raises(TypeError):
        Point(1, 2, (), 4)  # type: ignore[call-arg]
    assert dataclasses.is_dataclass(point) and Point.__match_args__ == ("x", "y", "tags")
    match point:
        case Point(1, y):
            assert y == 0
        case _:
            pytest.fail("match args")


@record(frozen=False)
class Bag:
    name: str
    items: list[int] = factory(list)


def test_mutable_records_get_a_fresh_default_each_and_are_unhashable() -> None:
    first, second = Bag("a"), Bag("a")
    first.items.append(1)
    assert second.items == [] and first != second and Bag("b", [1]) == Bag("b", [1])
    first.name = "renamed"
    assert repr(first) == "Bag(name='renamed', items=[1])"
    with pytest.raises(TypeError):
        hash(first)
    assert dataclasses.replace(second, name="c") == Bag("c")


def test_model_values_compare_by_value() -> None:
    net = ipaddress.ip_network("10.0.0.0/8")
    rule = Rule("nat", "ISTIO_OUTPUT", (Address("dst", net),), Ports("dst", (80,)))  # type: ignore[arg-type]
    assert rule == Rule("nat", "ISTIO_OUTPUT", (Address("dst", net),), Ports("dst", (80,)))  # type: ignore[arg-type]
    assert Rule.__doc__ and RuleSet.__dataclass_fields__


def test_the_cli_path_imports_nothing_heavy() -> None:
    import subprocess

    code = (
        "import sys; from istio_iptables.frontends.cli.main import main\n"
        "try: main(['--dry-run', '-i', '*', '-b', '*', '--log_output_level=default:none'])\n"
        "except SystemExit: pass\n"
        "print(sorted(sys.modules), file=sys.stderr)"
    )
    done = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, check=True)
    loaded = set(ast.literal_eval(done.stderr.strip().splitlines()[-1]))
    heavy = {"iptc", "pyroute2", "subprocess", "socket", "difflib", "logging", "json", "shutil", "locale"}
    heavy |= {"dataclasses", "zlib", "hashlib"}
    assert not heavy & loaded, sorted(heavy & loaded)


def test_every_module_logs_through_the_configured_logger() -> None:
    """A module-level logging.getLogger() would write nowhere once the CLI has configured our logger."""
    from pathlib import Path

    package = Path(__file__).resolve().parents[2] / "istio_iptables"
    offenders = [
        str(path.relative_to(package))
        for path in package.rglob("*.py")
        if path.name != "log.py" and "logging.getLogger(" in path.read_text()
    ]
    assert offenders == [], "use: from istio_iptables._lib.log import log"
