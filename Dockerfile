# One image for every process of the dispatcher: worker, beat, Flower, webhooks, SMPP receiver.
FROM python:3.11-slim

RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential pkg-config libmariadb-dev \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY requirements.lock ./
RUN pip install --no-cache-dir --require-hashes -r requirements.lock
COPY . .
RUN pip install --no-cache-dir --no-deps --no-build-isolation -e . \
 && useradd --system --home /app sms && mkdir -p /app/var && chown sms /app/var
USER sms
ENV PYTHONUNBUFFERED=1
