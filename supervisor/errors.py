"""Error kinds and their exit codes, in one table.

Every error the operator can see carries a one-line message that names where the problem is
(file and key) and how to fix it. `main()` functions map an error's class to an exit code with
`exit_code_for` instead of an `except` ladder.
"""

from __future__ import annotations


class SupervisorError(Exception):
    """Base class: `str(err)` is the one line shown to the operator."""

    exit_code = 1


class ConfigError(SupervisorError):
    """Bad input in a stack file, homeserver.yaml or a key/secret file. Nothing was touched."""

    exit_code = 2

    def __init__(self, file: str, key: str, problem: str, fix: str = "") -> None:
        self.file = str(file)
        self.key = key
        self.problem = problem
        self.fix = fix
        where = f"{self.file}: {key}" if key else self.file
        line = f"{where}: {problem}"
        if fix:
            line += f" (fix: {fix})"
        super().__init__(line)


class UsageError(SupervisorError):
    """A command line that does not make sense."""

    exit_code = 2


class DockerUnavailable(SupervisorError):
    """The Docker engine does not answer."""

    exit_code = 3


class DaemonNotRunning(SupervisorError):
    """synapsectl could not reach the daemon's control socket."""

    exit_code = 3


class StartFailed(SupervisorError):
    """A container did not become ready; the stack start was abandoned in order."""

    exit_code = 4


def exit_code_for(err: BaseException) -> int:
    return getattr(err, "exit_code", 1)


class OneLineArgumentParser(__import__("argparse").ArgumentParser):
    """argparse, but a bad command line is one line on stderr with the fix, exit code 2."""

    def error(self, message: str):
        import sys
        sys.stderr.write(f"{self.prog}: {message} (fix: see {self.prog} --help)\n")
        sys.exit(2)
