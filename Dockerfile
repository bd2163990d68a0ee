# The scheduler image: one image for beat, the planner, job workers, Flower
# and the HTTP API; docker-compose.yml picks the command.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md celeryconfig.py ./
COPY scheduler ./scheduler
COPY workers_bridge ./workers_bridge
COPY examples ./examples
# The folders compose mounts its named volumes on must exist, owned by the
# user that writes them: Docker copies this ownership into a new volume.
RUN pip install . && useradd --create-home --uid 1000 dcm \
    && mkdir -p /var/lib/dcm-scheduler /data/outputs /data/dicom \
    && chown dcm:dcm /var/lib/dcm-scheduler /data/outputs /data/dicom
USER dcm
CMD ["celery", "-A", "scheduler", "worker", "--loglevel", "INFO"]
