"""The bottom layer every package builds on: the strict config machinery (core.config), the packed microbatch
that data/ produces and model/, parallel/ and train/ consume (core.batch), and the dtype names (core.dtypes).
core/ imports nothing of the project."""
