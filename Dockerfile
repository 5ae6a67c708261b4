# One image for every Haulage process: workers, beat, Flower, the HTTP service and the Cloud Run Job.
FROM python:3.11-slim
WORKDIR /app
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
# Haulage itself, installed as the one package `haulage` (with every service's client).
COPY pyproject.toml README.md ./
COPY haulage ./haulage
RUN pip install --no-cache-dir ".[all]"
# This deployment's own files: its Celery settings and its workflows (HAULAGE_MODULES).
COPY celeryconfig.py ./
COPY tasks ./tasks
COPY workflows ./workflows
COPY dispatch ./dispatch
ENV PYTHONPATH=/app HAULAGE_CELERYCONFIG=celeryconfig HAULAGE_MODULES=workflows
CMD ["haulage", "worker", "--queues", "short"]
