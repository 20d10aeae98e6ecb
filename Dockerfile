FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY core core
COPY api api
COPY workers workers
COPY adapters adapters
COPY storage storage
COPY cli cli
COPY genroute genroute
RUN pip install --no-cache-dir . && useradd --system genroute
USER genroute
EXPOSE 8000
CMD ["genroute", "api", "--host", "0.0.0.0", "--port", "8000"]
