# syntax=docker/dockerfile:1
# One image carries all three cplink binaries; the operator runs servers and agents from it
# (their pods set `command` explicitly), so the entrypoint is the operator.

# The toolchain this workspace is built and tested with (kube 5 needs at least 1.89).
FROM rust:1.95-bookworm AS builder
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p cplink-server -p cplink-agent -p cplink-operator \
 && mkdir -p /out \
 && cp target/release/cplink-server target/release/cplink-agent target/release/cplink-operator /out/

# glibc-based and shell-less; `nonroot` is uid/gid 65532, matching the pods' runAsUser.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=builder /out/cplink-server /out/cplink-agent /out/cplink-operator /usr/local/bin/
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/cplink-operator"]
