# One image for every Haulage process: workers, beat, Flower, the HTTP service and the Cloud Run Job.
FROM python:3.11-slim
WORKDIR /app
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
COPY pyproject.toml README.md celeryconfig.py ./
COPY haulage ./haulage
COPY tasks ./tasks
COPY workflows ./workflows
COPY dispatch ./dispatch
COPY progress ./progress
COPY cli ./cli
COPY api ./api
RUN pip install --no-cache-dir .
# Application modules (HAULAGE_MODULES) are copied or installed on top of this image.
CMD ["haulage", "worker", "--queues", "short"]
