"""Tools for child processes that the runner and xray/ both use, and that import nothing of
either: process groups, exits, the subreaper, line splitting (a layer of its own below the
libraries, see pyproject.toml's [tool.importlinter])."""
