"""The errors plugtune shows to users: each names what is at fault and how to fix it."""


class PlugtuneError(Exception):
    """A problem with the user's input or environment; the CLI prints it without a traceback."""

    exit_code = 1


class RecipeError(PlugtuneError):
    """One or more problems with a recipe, all listed at once (exit status 2): one problem is
    one line, ``SOURCE: KEY: what is wrong; how to fix it``."""

    exit_code = 2

    def __init__(self, problems, source=None):
        self.problems = list(problems)
        self.source = source
        if len(self.problems) == 1:  # one problem, one line
            super().__init__(f"{source}: {self.problems[0]}" if source else self.problems[0])
            return
        where = f" in {source}" if source else ""
        lines = [f"{len(self.problems)} problem(s){where}:"] + [f"  - {p}" for p in self.problems]
        super().__init__("\n".join(lines))


class DataError(PlugtuneError):
    """A data file or record is unusable; the message names the file and line."""

    exit_code = 2


class InputError(PlugtuneError):
    """A bad input found outside the recipe's schema — a model source that cannot be loaded, a
    run directory that cannot be made — in one line naming the key or path (exit status 2)."""

    exit_code = 2


class PluginError(PlugtuneError):
    """A plugin failed to import or broke the hook contract; the message names it."""

    exit_code = 3
