# syntax=docker/dockerfile:1
# orders-service image: a cached dependency layer (cargo-chef), a release build, and a
# distroless runtime as a numeric non-root user. No HEALTHCHECK: Kubernetes probes
# (/healthz, /readyz, gRPC health) do that.
#
#   docker build -t orders-service:dev .
#   docker run --rm -p 8080:8080 -p 50051:50051 orders-service:dev   # SQLite, embedded bus

ARG RUST_VERSION=1.95.0

FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS chef
# The toolchain file pins the same version, so rustup has nothing to download.
RUN cargo install cargo-chef --locked --version 0.1.78
WORKDIR /src

FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS builder
COPY --from=planner /src/recipe.json recipe.json
# Dependencies only: this layer is reused until Cargo.toml or Cargo.lock change.
RUN cargo chef cook --release --locked --recipe-path recipe.json --bin orders-service
COPY . .
# The commit in orders_service_build_info (after the dependency layer, so it does not bust it).
ARG GIT_COMMIT=unknown
ENV GIT_COMMIT=${GIT_COMMIT}
RUN cargo build --release --locked --bin orders-service \
 && install -D -m 0755 target/release/orders-service /out/orders-service

# glibc, libgcc, libssl3 (rdkafka's TLS and SASL) and CA certificates; zlib is linked
# statically (rdkafka's libz-static). The builder image has libssl-dev and pkg-config.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=builder /out/orders-service /usr/local/bin/orders-service
# 65532 is distroless's "nonroot"; numeric so runAsNonRoot can verify it.
USER 65532:65532
WORKDIR /home/nonroot
ENV APP_HTTP__ADDR=0.0.0.0:8080 \
    APP_GRPC__ADDR=0.0.0.0:50051 \
    APP_ADMIN__ADDR=0.0.0.0:9090 \
    APP_LOG_FORMAT=json
EXPOSE 8080 50051 9090
ENTRYPOINT ["/usr/local/bin/orders-service"]
CMD ["serve"]
