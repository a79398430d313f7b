"""Read an ``nft -f`` script (ours or Istio's golden) into the ruleset it leaves behind, without a kernel.

Only the commands both scripts use are understood: add/flush/delete table, add chain, add/insert
rule (``insert ... index N`` puts the rule before the N-th rule, 0-based). Rule texts are
normalised to spellings nft treats as the same expression (quotes, ``meta skuid``, CIDR form).
"""

from __future__ import annotations

import re

from tests.support.conformance import normalise as normalise_cidrs

Chains = dict[str, tuple[str, list[str]]]  # chain -> (hook spec or "", rules)


def normalise_rule(text: str) -> str:
    text = text.replace('"', "")
    text = re.sub(r"\bmeta (sk[ug]id)\b", r"\1", text)
    return normalise_cidrs(text)


def final_ruleset(script: str) -> dict[str, Chains]:
    """``{"inet T": {chain: (hook, [rule, ...])}}`` in creation order, as the kernel would list it."""
    tables: dict[str, Chains] = {}
    for line in script.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        verb, kind, family, table, *rest = line.split(maxsplit=4)
        key = f"{family} {table}"
        if kind == "table":
            if verb == "add":
                tables.setdefault(key, {})
            elif verb == "delete":
                del tables[key]
            elif verb == "flush":
                for _hook, rules in tables[key].values():
                    rules.clear()
            else:
                raise ValueError(f"unexpected command: {line}")
        elif kind == "chain" and verb == "add":
            name, *spec = rest[0].split(maxsplit=1)
            tables[key].setdefault(name, (spec[0] if spec else "", []))
        elif kind == "rule":
            chain, body = rest[0].split(maxsplit=1)
            rules = tables[key][chain][1]
            if verb == "add":
                rules.append(normalise_rule(body))
            elif verb == "insert":
                index, _, body = body.removeprefix("index ").partition(" ")
                rules.insert(int(index), normalise_rule(body))
            else:
                raise ValueError(f"unexpected command: {line}")
        else:
            raise ValueError(f"unexpected command: {line}")
    return tables
