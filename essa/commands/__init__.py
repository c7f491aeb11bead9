"""The commands that are more than a call into the library: `essa score`, `essa eval` and `essa recipe
check`. essa/cli.py parses arguments and calls these; `essa align`, `essa export` and `essa report`
call essa.align, essa.export and essa.report directly."""
