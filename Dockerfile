# Multi-stage build: the Rust toolchain builds, a slim Debian image runs.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src src
RUN apt-get update && apt-get install -y --no-install-recommends cmake && rm -rf /var/lib/apt/lists/* \
 && cargo build --release --locked --bin kafka-s3-archiver

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/kafka-s3-archiver /usr/local/bin/kafka-s3-archiver
WORKDIR /var/lib/kafka-s3-archiver
ENV SPOOL_DIR=/var/lib/kafka-s3-archiver/spool
EXPOSE 8083
ENTRYPOINT ["kafka-s3-archiver"]
