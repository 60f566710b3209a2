"""Commands: admission, dispatch, handlers and what an exec command runs in (environment, processes)."""
