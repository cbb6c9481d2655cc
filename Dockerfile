# fhirgate container image: build with the Rust toolchain, run on distroless as non-root.
#   docker build -t fhirgate .
#   docker run --read-only -v /etc/fhirgate:/etc/fhirgate:ro -p 8443:8443 fhirgate
# The image carries no certificates or keys: mount them read-only with the config.
FROM rust:1-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
RUN cargo build --release --locked

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/fhirgate /usr/local/bin/fhirgate
USER nonroot:nonroot
# 8443: TLS-MA listener; 9901: admin (healthz, readyz, metrics).
EXPOSE 8443 9901
ENTRYPOINT ["/usr/local/bin/fhirgate"]
CMD ["run", "--config", "/etc/fhirgate/config.yaml"]
