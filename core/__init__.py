"""The bottom layer every package builds on: the strict config machinery (core.config), the packed microbatch
that data/ produces and model/, parallel/ and train/ consume (core.batch), the dtype names (core.dtypes) and
process liveness for stale locks (core.process). core/ imports nothing of the project."""
