"""
The rules file in service: loaded at start-up, reloaded on SIGHUP.

A reload swaps the factory's policy for new sessions only; sessions already
relaying keep going.  A file that doesn't parse is reported (every error)
and the rules in force stay.  Without a rules file SIGHUP is still caught
(its default action would kill the server: C{systemctl reload} sends it)
and only logged.
"""

from __future__ import annotations

import signal
from types import FrameType
from typing import Any

from twisted.application import service
from twisted.internet.interfaces import IReactorFromThreads
from twisted.logger import Logger

from socks4tx.rules import RulesError, load_rules
from socks4tx.server import SOCKS4Factory

log = Logger(namespace="socks4tx.rules")


class RulesReloader(service.Service):
    """
    Reloads C{path} into C{factory.policy} on SIGHUP (and on L{reload});
    C{path} None: the built-in policy, nothing to reload.
    """

    def __init__(
        self, path: str | None, factory: SOCKS4Factory, reactor: IReactorFromThreads
    ) -> None:
        self.path = path
        self.factory = factory
        self.reactor = reactor
        self._previous_handler: Any = None

    def startService(self) -> None:
        super().startService()
        self._previous_handler = signal.signal(signal.SIGHUP, self._on_sighup)

    def stopService(self) -> None:
        super().stopService()
        if self._previous_handler is not None:
            signal.signal(signal.SIGHUP, self._previous_handler)
            self._previous_handler = None

    def _on_sighup(self, signum: int, frame: FrameType | None) -> None:
        # A signal handler runs between two bytecodes of whatever the
        # reactor was doing: do the work in the reactor's own time.
        self.reactor.callFromThread(self.reload)

    def reload(self) -> bool:
        """Load the file again; C{True} if the new rules are in force."""
        if self.path is None:
            log.info("SIGHUP: no --rules file to reload; the built-in policy stays")
            return False
        try:
            rules = load_rules(self.path)
        except (RulesError, OSError) as error:
            log.error(
                "rules not reloaded, the rules in force stay: {error}",
                error=str(error),
            )
            return False
        self.factory.policy = rules
        log.info(
            "rules reloaded from {path}: {count} rule{s}",
            path=self.path,
            count=len(rules),
            s="" if len(rules) == 1 else "s",
        )
        return True
