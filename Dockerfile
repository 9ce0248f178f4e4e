# syntax=docker/dockerfile:1
# The service in a container: gunicorn as a non-root user, SQLite in the volume
# /srv/agent-sessions/data unless AGENT_SESSIONS_STORAGE_URL names PostgreSQL
# (deploy/compose.yaml). Build: docker build -t agent-sessions .

FROM python:3.11-slim AS build
WORKDIR /src
COPY setup.cfg pyproject.toml README.md config.py wsgi.py ./
COPY sessions_app ./sessions_app
COPY storage_backends ./storage_backends
RUN python -m venv /opt/agent-sessions \
    && /opt/agent-sessions/bin/pip install --no-cache-dir --disable-pip-version-check ".[postgres,redis,fast]"

FROM python:3.11-slim
RUN groupadd --system --gid 10001 agent-sessions \
    && useradd --system --uid 10001 --gid agent-sessions --no-create-home agent-sessions \
    && mkdir -p /srv/agent-sessions/data \
    && chown agent-sessions:agent-sessions /srv/agent-sessions/data
COPY --from=build /opt/agent-sessions /opt/agent-sessions
WORKDIR /srv/agent-sessions
COPY gunicorn.conf.py wsgi.py ./
ENV PATH=/opt/agent-sessions/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    AGENT_SESSIONS_BIND=0.0.0.0:8000 \
    AGENT_SESSIONS_STORAGE_URL=sqlite:////srv/agent-sessions/data/sessions.db
USER 10001:10001
VOLUME ["/srv/agent-sessions/data"]
EXPOSE 8000
# Ready means the storage answers: /readyz is 503 otherwise.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4).status != 200)"]
CMD ["gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"]
