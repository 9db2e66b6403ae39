"""The one base class of user errors. Every error in what the user asked for (a flag, the config, a prompts file,
images, the model directory, a profile, a checkpoint, a render that cannot fit) derives from `UserError`, so the
entry points (freeloc_dist.cli.main_with_exit_codes) recognise them all with one `isinstance`: one line on
stderr, exit code 2, on every rank. The module-specific subclasses also derive from ValueError where callers
catch them as such. No imports: the lightest module of the package.
"""


class UserError(Exception):
    """An error in what the user asked for; printed as one line, exit code 2."""
