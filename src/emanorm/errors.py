"""Errors a user can fix: the CLI prints their one-line message, never a traceback."""


class UserError(Exception):
    """Bad input from the user (a flag, a file, a config); the message says what and what is allowed."""


#: The exit status of a run stopped by a signal after writing its checkpoint (sysexits' EX_TEMPFAIL:
#: "try again"): a job script can requeue on it.
RESUMABLE_EXIT = 75


class Preempted(Exception):
    """The run stopped on a signal after checkpointing; rerun with ``--resume`` to continue."""

    exit_code = RESUMABLE_EXIT


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) stopped a run; the message says which checkpoint is kept and how to go on.

    Unlike a stop signal it lands mid-step, so no new checkpoint is written: the last one (end of
    the last epoch, or ``checkpoint_every_steps``) is what ``--resume`` continues from.
    """

    exit_code = 130  # 128 + SIGINT, what a shell reports for Ctrl-C


class NonFiniteLossError(UserError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def first_line(err: BaseException, limit: int | None = None) -> str:
    """The first line of ``err``'s message (its class name when it has none), cut at ``limit``
    characters with "...": what torch, zipfile or the OS raise can run to paragraphs, and an
    error of ours is one line."""
    text = str(err).strip()
    line = text.splitlines()[0] if text else type(err).__name__
    return line if limit is None or len(line) <= limit else line[:limit] + "..."
