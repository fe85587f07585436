"""`make bench`: the saga system against a bare Celery chain and a one-process floor, in one run."""
