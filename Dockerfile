# octserve, CPU image.
#
#   docker build -t octserve:0.1.0 .
#   docker run --rm -p 50051:50051 -p 8000:8000 -p 9090:9090 octserve:0.1.0
#
# The CUDA image is Dockerfile.cuda: its base images (nvidia/cuda devel and runtime) and build
# environment differ in every stage, so a second file reads better than build arguments here.
# Stages: chef (toolchain + cargo-chef) -> planner (recipe.json: the dependency graph only) ->
# builder (dependencies in their own cached layer, then the binary) -> runtime (slim, non-root).

# Builder and runtime are the same Debian release, so the binary finds the glibc it was linked to.
FROM rust:1.95-slim-bookworm AS chef
RUN cargo install cargo-chef --locked --version 0.1.77
WORKDIR /src

FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS builder
COPY --from=planner /src/recipe.json recipe.json
# The dependency layer: rebuilt only when Cargo.toml or Cargo.lock change, not on source edits.
RUN cargo chef cook --locked --profile dist --recipe-path recipe.json
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto proto
COPY src src
# CI checks the same lock file with `cargo ... --locked`; [profile.dist] is in Cargo.toml.
RUN cargo build --locked --profile dist \
    && cp target/dist/octserve /usr/local/bin/octserve
# Model files must be readable by the runtime user whatever modes the build context had.
COPY models models
RUN chmod -R a+rX,go-w models

FROM debian:bookworm-slim AS runtime
# A numeric UID, so Kubernetes' runAsNonRoot can verify it without an /etc/passwd lookup.
RUN groupadd --system --gid 10001 octserve \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin octserve
COPY --from=builder /usr/local/bin/octserve /usr/local/bin/octserve
COPY --from=builder /src/models /opt/octserve/models
# `serve` finds models/*/manifest.toml relative to the working directory (--models-dir models).
WORKDIR /opt/octserve
USER 10001:10001
# gRPC (Classifier, KServe v2, health, reflection) and Prometheus /metrics.
EXPOSE 50051 8000 9090
ENTRYPOINT ["octserve", "serve"]
