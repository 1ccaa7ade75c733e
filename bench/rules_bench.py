#!/usr/bin/env python3
"""
Microseconds per rules decision, for a 1-rule and a 1,000-rule file.

The 1,000-rule file is the worst case for a first-match scan: the request
is decided by the last rule.  Its rules use 25 different source masks (/8
to /32), 9 destination masks, every port operator, userlists and ident
modes, so the index has real work to do.  Each figure is the best of
several runs, with the decision cache off (every decide() goes through the
index) and on (the same request again: a cache hit), beside a plain linear
scan of the rules for comparison.

    python bench/rules_bench.py [--number N]

The budget (issue 3): well under 5% of a ~250 us handshake, i.e. < 5 us.
"""

from __future__ import annotations

import argparse
import random
import sys
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from socks4tx.rules import Rule, RuleSet, destination_key, parse_rules, source_key
from socks4tx.wire import Command

REQUEST = ("192.168.1.20", "10.20.30.40", 8080, b"alice", Command.CONNECT)
OPS = ["eq", "neq", "lt", "gt", "le", "ge"]


def one_rule() -> str:
    return "permit 0.0.0.0 0.0.0.0\n"


def many_rules(count: int = 1000) -> str:
    """C{count - 1} rules that miss REQUEST, then one that permits it."""
    chance = random.Random(4)
    lines = []
    while len(lines) < count - 1:
        prefix = chance.randint(8, 32)
        # Sources in 172.16.0.0/12: never the request's 192.168.1.20.
        source = f"172.{chance.randint(16, 31)}.{chance.randint(0, 255)}.0/{prefix}"
        fields = [chance.choice(["permit", "deny"])]
        if chance.random() < 0.3:
            fields.append(chance.choice(["?=I", "?=i", "?=n"]))
        if chance.random() < 0.3:
            fields.append("*=" + ",".join(f"user{chance.randint(0, 99)}" for _ in "ab"))
        fields.append(source)
        if chance.random() < 0.7:
            fields.append(f"10.{chance.randint(0, 255)}.0.0/{chance.randint(8, 16)}")
        if chance.random() < 0.7:
            fields += [chance.choice(OPS), str(chance.randint(1, 65535))]
        lines.append(" ".join(fields))
    lines.append("permit ?=i *=alice,bob 192.168.1.0 255.255.255.0 10.0.0.0/8 ge 1024")
    return "\n".join(lines) + "\n"


def linear(rules: RuleSet) -> Rule | None:
    """First match by a plain loop (addresses converted once)."""
    source, destination, port, userid, _ = REQUEST
    version, address = source_key(source)
    target = destination_key(destination)
    for rule in rules.rules:
        if (
            rule.source.contains(version, address)
            and (rule.destination is None or rule.destination.contains(4, target))
            and (rule.port is None or rule.port(port))
            and (rule.users is None or userid in rule.users)
        ):
            return rule
    return None


def measure(call: object, number: int) -> float:
    """Best microseconds per call over 5 runs."""
    timer = timeit.Timer(call)  # type: ignore[arg-type]
    return min(timer.repeat(5, number)) / number * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--number", type=int, default=20000, help="calls per run")
    number = parser.parse_args().number
    print(f"{'rules':>6} {'cache off':>10} {'cache on':>10} {'linear scan':>12}  (us)")
    for name, text in [("1", one_rule()), ("1000", many_rules())]:
        cold = parse_rules(text, name, cache_size=0)
        warm = parse_rules(text, name)
        decision = cold.decide(*REQUEST)
        assert decision.permit and decision.rule == f"{name}:{len(cold)}", decision
        assert warm.decide(*REQUEST) == decision
        assert linear(cold) is cold.rules[-1]
        off = measure(lambda r=cold: r.decide(*REQUEST), number)
        on = measure(lambda r=warm: r.decide(*REQUEST), number)
        scan = measure(lambda r=cold: linear(r), max(1, number // 100))
        print(f"{name:>6} {off:10.2f} {on:10.2f} {scan:12.1f}")


if __name__ == "__main__":
    main()
