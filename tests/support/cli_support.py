"""Running the command line in-process, as the unit tests do (shared by several test modules)."""

from __future__ import annotations

from click.testing import CliRunner, Result

from istio_iptables.frontends.cli import main as cli
from tests.support.conformance import Case
from tests.support.fakes import FakeHost

RESOLV_CONF = "/test/resolv.conf"

INJECTOR_ARGV = [
    "-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-x", "", "-b", "*",
    "-d", "15090,15021,15020", "--log_output_level=default:info",
]  # fmt: skip


def invoke(args: list[str], env: dict[str, str] | None = None, host: FakeHost | None = None) -> Result:
    return CliRunner().invoke(cli.command, args, env=env or {}, obj={"host": host or FakeHost()})


def nft_dry_run(case: Case, *extra: str) -> str:
    host = FakeHost(files={RESOLV_CONF: case.resolv_conf or ""})
    result = CliRunner().invoke(
        cli.command,
        ["--dry-run", "--native-nftables", *extra, *case.cli_args(RESOLV_CONF)],
        env=case.env,
        obj={"host": host},
    )
    assert result.exit_code == 0, result.output
    return result.stdout
