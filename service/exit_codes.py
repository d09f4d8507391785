"""Exit codes of every ``convray`` command, so scripts can tell a usage error from an unreachable server."""

EXIT_OK = 0
EXIT_FAILED = 1  # the command ran and something it was asked to do failed
EXIT_USAGE = 2  # bad flags or inputs; nothing was attempted
EXIT_UNREACHABLE = 3  # no server answered (or it said UNAVAILABLE)
