# Image for the producer, the detector and the one-shot schema registration (docker-compose.yml).
FROM python:3.11-slim

WORKDIR /app
COPY pyproject.toml README.md ./
COPY fraudstream/ fraudstream/
COPY producer/ producer/
COPY consumer/ consumer/
RUN pip install --no-cache-dir .

# The schemas are data read at run time, not part of the installed package.
COPY schemas/ schemas/
ENV FRAUDSTREAM_SCHEMAS_DIR=/app/schemas \
    PYTHONUNBUFFERED=1

USER nobody
ENTRYPOINT ["fraudstream"]
