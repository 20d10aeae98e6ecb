FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md requirements.lock ./
# the locked versions CI tested, hash-checked, in their own layer; then genroute on top
RUN pip install --no-cache-dir --require-hashes -r requirements.lock
COPY core core
COPY api api
COPY workers workers
COPY adapters adapters
COPY storage storage
COPY cli cli
COPY genroute genroute
RUN pip install --no-cache-dir --no-deps . && useradd --system genroute
USER genroute
EXPOSE 8000
CMD ["genroute", "api", "--host", "0.0.0.0", "--port", "8000"]
