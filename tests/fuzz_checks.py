"""Schemathesis checks of our own: load with SCHEMATHESIS_HOOKS=tests/fuzz_checks.py.

`st run ... --checks all` then also runs `no_internals_leak` on every response
(docs/SECURITY.md: the short run in tests/test_security.py, the long one there).
"""

import re

import schemathesis

# What a leaking error page or message looks like: a Python traceback, Django's debug
# pages, database driver errors, file paths of the code.
LEAKS = re.compile(
    r"Traceback \(most recent call last\)"
    r"|File \"[^\"]+\.py\", line \d+"
    r"|Exception Value:|You're seeing this error because you have <code>DEBUG = True"
    r"|psycopg|django\.db\.utils|IntegrityError|OperationalError|ProgrammingError"
    r"|site-packages/|/orders_project/"
)


@schemathesis.check
def no_internals_leak(ctx: schemathesis.CheckContext, response: schemathesis.Response, case: schemathesis.Case) -> None:
    """No response shows a traceback, a debug page, a database error or a source path."""
    text = response.content.decode("utf-8", errors="replace")
    if match := LEAKS.search(text):
        excerpt = text[max(0, match.start() - 80) : match.end() + 80]
        raise AssertionError(f"the response leaks internals: ...{excerpt}...")
