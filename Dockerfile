# kafka-s3-archiver image: the Rust toolchain builds, a slim Debian of the same release runs
# (same glibc; the binary links only libc, libm, libgcc_s and libz, all in the slim image).
#   docker build -t kafka-s3-archiver .
#   docker run --env-file .env -p 8083:8083 -v "$PWD/spool:/var/lib/kafka-s3-archiver/spool" kafka-s3-archiver

FROM rust:1.95-bookworm AS build
# cmake: aws-lc-sys (the S3 client's TLS) builds with it. OpenSSL and librdkafka are compiled
# from source by their crates with the image's gcc, make and perl.
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY src src
# --locked: the image gets exactly the dependency versions the tests ran with. The release profile
# keeps debug info for profiling; the image drops it (143 MB -> 29 MB) but keeps the symbols,
# so a panic's backtrace still names functions.
RUN CARGO_PROFILE_RELEASE_STRIP=debuginfo cargo build --release --locked --bin kafka-s3-archiver

FROM debian:bookworm-slim
# ca-certificates: HTTPS to Amazon S3 and TLS to brokers with publicly signed certificates.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
# A fixed numeric id, so a bind-mounted ./spool can be given to it on the host:
#   sudo chown 10001:10001 spool
RUN groupadd --system --gid 10001 archiver \
 && useradd --system --uid 10001 --gid archiver --home-dir /var/lib/kafka-s3-archiver \
      --no-create-home --shell /usr/sbin/nologin archiver \
 && mkdir -p /var/lib/kafka-s3-archiver/spool /var/lib/kafka-s3-archiver/data \
 && chown -R archiver:archiver /var/lib/kafka-s3-archiver
COPY --from=build /src/target/release/kafka-s3-archiver /usr/local/bin/kafka-s3-archiver

# The working directory makes the defaults land here: ./data (local store) and a .env, if mounted.
WORKDIR /var/lib/kafka-s3-archiver
ENV SPOOL_DIR=/var/lib/kafka-s3-archiver/spool
# Records wait here until both their objects are stored: it must outlive the container. Declared
# after the chown above, so a new volume starts owned by the archiver user.
VOLUME ["/var/lib/kafka-s3-archiver/spool"]
USER archiver:archiver
EXPOSE 8083
# No curl in the slim image: bash's /dev/tcp speaks just enough HTTP. /readyz answers 503 while no
# partition is assigned, the store is unreachable or archiving stopped (UNDECODABLE=stop), so
# "unhealthy" means "not archiving", not only "not running".
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 CMD \
    bash -c 'exec 3<>"/dev/tcp/127.0.0.1/${REST_PORT:-8083}" && printf "GET /readyz HTTP/1.0\r\n\r\n" >&3 && read -r _ code _ <&3 && [ "$code" = 200 ]'
# SIGTERM (docker stop) lets uploads in flight finish for SHUTDOWN_TIMEOUT: give docker stop a
# longer --time (docker-compose.yml sets stop_grace_period).
ENTRYPOINT ["/usr/local/bin/kafka-s3-archiver"]
