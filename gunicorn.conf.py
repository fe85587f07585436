"""gunicorn's settings beyond the command line's; gunicorn reads this file from the working
directory it starts in (the repository's root: the Procfile, the Dockerfile and compose).

The access log names each request's path, not its query string, and not its referer (the
page before, query string and all): the admin's searches put the customers' emails and
phone numbers in the query string (`?q=`), and logs are kept and read more widely than the
database (docs/SECURITY.md, "Logs"). Otherwise gunicorn's default format.
"""

access_log_format = '%(h)s %(l)s %(u)s %(t)s "%(m)s %(U)s %(H)s" %(s)s %(b)s "%(a)s"'
