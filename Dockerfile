# syntax=docker/dockerfile:1
#
# singleflight's container image: `docker compose up --build -d` builds it as the `app` service.
#
# Four stages. `chef` holds the toolchain and cargo-chef. `planner` reduces the sources to a
# recipe (Cargo.toml, Cargo.lock and the list of targets, with no code), so the `builder`'s
# dependency layer is rebuilt only when dependencies change, not on every edit under src/; then it
# builds the service from the full sources (migrations/ is embedded into the binary at compile
# time). The repository is a workspace: `--package singleflight` builds the service alone, with
# the features its own dependencies ask for; the other members (launcher/, loadtest/, testkit/, promtext/)
# are in the context only because cargo reads every member's manifest. `runtime` is a slim Debian with the binary, curl for the HEALTHCHECK, and a non-root user.

FROM rust:1-bookworm AS chef
RUN cargo install cargo-chef --locked --version 0.1.78
WORKDIR /app

FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS builder
COPY --from=planner /app/recipe.json recipe.json
# Dependencies only: this layer is cached until Cargo.toml or Cargo.lock change.
RUN cargo chef cook --release --locked --recipe-path recipe.json --package singleflight --bin singleflight
COPY . .
RUN cargo build --release --locked --package singleflight --bin singleflight

FROM debian:bookworm-slim AS runtime
# Package versions are left to bookworm's current security updates rather than pinned.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 singleflight \
    && useradd --system --uid 10001 --gid singleflight --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin singleflight
COPY --from=builder /app/target/release/singleflight /usr/local/bin/singleflight
# Numeric, so that orchestrators can verify it is not root without reading /etc/passwd.
USER 10001:10001
ENV HTTP_ADDR=0.0.0.0:8080 \
    RUST_LOG=info
EXPOSE 8080
# Probes the port above: a container that moves HTTP_ADDR elsewhere needs its own healthcheck.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["curl", "-fsS", "-o", "/dev/null", "--max-time", "2", "http://127.0.0.1:8080/healthz"]
ENTRYPOINT ["/usr/local/bin/singleflight"]
