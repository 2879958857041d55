# Image for the producer, the detector and the one-shot schema registration (docker-compose.yml).
FROM python:3.11-slim

WORKDIR /app
COPY pyproject.toml README.md ./
COPY fraudstream/ fraudstream/
COPY producer/ producer/
COPY consumer/ consumer/
# Package data (pyproject.toml's package-dir): the schemas, the stack's templates, the default rules.
COPY schemas/ schemas/
COPY infra/ infra/
COPY rules/ rules/
RUN pip install --no-cache-dir .

ENV PYTHONUNBUFFERED=1

USER nobody
ENTRYPOINT ["fraudstream"]
