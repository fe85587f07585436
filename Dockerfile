# One image for every process: web, the five Celery workers, beat, Flower and the
# one-shot `migrate` job (docker-compose.yml picks the process with `command:`).
# The default command is the web server, so the image also runs alone:
#   docker build -t saga-orders . && docker run -p 8000:8000 -e DATABASE_URL=... saga-orders
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    DJANGO_SETTINGS_MODULE=orders_project.settings

# An unprivileged user with a fixed UID/GID, so volume ownership is predictable. Its home
# is writable (gunicorn puts its control socket in ~/.gunicorn); the code is not.
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --create-home --home-dir /home/app \
        --shell /usr/sbin/nologin app

WORKDIR /app

# Dependencies first, so this layer is rebuilt only when requirements.txt changes. The
# runtime set only: no test or development tool (requirements-dev.txt) goes into the image
# (compose_tests/test_requirements.py). psycopg[binary] brings its own libpq: no compiler
# or system libraries are needed.
COPY requirements.txt .
RUN pip install -r requirements.txt

COPY . .

# Static files are collected into the image (STATIC_ROOT = /app/staticfiles, served by
# WhiteNoise). Settings need a SECRET_KEY to load, and with DEBUG off a strong one: this
# one is random, exists only for this step and is not kept in the image. collectstatic
# touches no database. .data/ is the one directory the app writes to (file-based SMS/mail).
RUN SECRET_KEY="$(python -c 'import secrets; print(secrets.token_urlsafe(50))')" DEBUG=False \
        python manage.py collectstatic --noinput \
    && mkdir -p /app/.data \
    && chown app:app /app/.data

# Numeric, so a runtime can check that it is not root (e.g. Kubernetes runAsNonRoot).
USER 10001:10001

EXPOSE 8000

# The Procfile's web process, listening on every interface. `exec` replaces the shell with
# gunicorn, so gunicorn itself receives SIGTERM and shuts down gracefully.
CMD ["sh", "-c", "exec gunicorn orders_project.wsgi --bind 0.0.0.0:${PORT:-8000} --workers 2 --threads 4 --access-logfile - --graceful-timeout 5"]
