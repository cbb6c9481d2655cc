# fhirgate container image for people with Docker: build with the Rust toolchain, run on
# distroless as the non-root user 65532.
#   docker build -t fhirgate:0.1.0 .
#   docker run --read-only --stop-timeout 35 -v /srv/fhirgate:/etc/fhirgate:ro -p 8443:8443 fhirgate:0.1.0
# (--stop-timeout: docker stop's SIGKILL comes after 10 s otherwise, inside the 30 s drain.)
# CI does not use this file (no Docker engine there, and the base images cannot be
# pulled): deploy/container/build makes the same layout with buildah from scratch (the
# binary, the libraries ldd lists, CA certificates, user 65532, the same ports, paths,
# ENTRYPOINT and CMD), and deploy/container/test runs that image. tests/it/deploy.rs keeps
# the two files in step. The image carries no certificates or keys: mount them
# read-only with the config at /etc/fhirgate.
FROM rust:1-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY bench ./bench
COPY deploy/release-build ./deploy/release-build
# The training run parses the shipped example configs too (and hashes them as inputs).
COPY examples ./examples
COPY config.yaml ./
# The release build with profile-guided optimisation (an instrumented build, a 25 s
# training run on the build container's loopback, a start-up trace under valgrind, the
# optimised build; it adds the rustup component llvm-tools). `cargo build --release
# --locked --bin fhirgate` works too, with 17-20% more CPU per request and about 3.5 MB
# more resident when idle.
RUN apt-get update && apt-get install -y --no-install-recommends valgrind \
 && rm -rf /var/lib/apt/lists/*
RUN deploy/release-build --out /out/fhirgate \
 && mkdir -p /out/etc/fhirgate /out/var/cache/fhirgate

# distroless/cc: glibc, libgcc, CA certificates and the user nonroot = 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/fhirgate /usr/local/bin/fhirgate
COPY --from=build /out/etc/fhirgate /etc/fhirgate
# The CRL cache: writable by the gateway only.
COPY --from=build --chown=65532:65532 --chmod=0700 /out/var/cache/fhirgate /var/cache/fhirgate
LABEL org.opencontainers.image.title="fhirgate" \
      org.opencontainers.image.description="Mutual-TLS security gateway for NHS FHIR APIs (BaRS receivers, Trust Integration Engines)" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0"
USER 65532:65532
VOLUME /var/cache/fhirgate
# 8443: TLS-MA listener; 9901: admin (healthz, readyz, metrics).
EXPOSE 8443 9901
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/fhirgate"]
CMD ["run", "--config", "/etc/fhirgate/config.yaml"]
