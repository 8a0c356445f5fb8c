# bfb container image: a multi-stage build producing a small image that runs
# as a non-root user. Build: docker build -t bfb .
# (This machine has no Docker engine; tests/deploy.rs checks this file and
# `make release` builds the same binary with the same command.)

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# The same command as `make release`.
RUN cargo build --release --locked --bin bfb

# distroless: glibc and CA certificates, no shell, no package manager.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/bfb /usr/local/bin/bfb
COPY config/bfb.example.toml /etc/bfb/bfb.toml
# nonroot = uid 65532.
USER nonroot:nonroot
EXPOSE 50051 9464
ENTRYPOINT ["/usr/local/bin/bfb"]
CMD ["serve", "--config", "/etc/bfb/bfb.toml"]
