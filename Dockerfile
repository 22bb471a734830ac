# syntax=docker/dockerfile:1
# One image carries all three cplink binaries, and the kubectl plugin; the operator runs servers
# and agents from it (their pods set `command` explicitly), so the entrypoint is the operator.

# The toolchain this workspace is built and tested with (kube 5 needs at least 1.89).
FROM rust:1.95-bookworm AS builder
WORKDIR /src
COPY . .
# The release profile keeps line tables; they go to a `.debug` file per binary, and the binary
# shipped is stripped of them and of its symbol table (cplink-agent, on every node: 59 MB as
# built, 11 MB shipped). Panic messages still name file:line: that location is in the code,
# not in the debug info. The `.gnu_debuglink` left in each binary lets gdb and addr2line find
# its `.debug` file.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p cplink-server -p cplink-agent -p cplink-operator -p cplink-cli \
 && mkdir -p /out \
 && for bin in cplink-server cplink-agent cplink-operator kubectl-cplink; do \
      cp "target/release/$bin" "/out/$bin" \
      && objcopy --only-keep-debug "/out/$bin" "/out/$bin.debug" \
      && objcopy --strip-all --add-gnu-debuglink="/out/$bin.debug" "/out/$bin" \
      || exit 1; \
    done

# The split-off debug info, for symbolizing a crash of a released image. Not part of the
# default build; export it with
#   docker build --target debug --output type=local,dest=./cplink-debug .
# then, e.g., `addr2line -e cplink-debug/cplink-agent.debug -f -C 0x...`.
FROM scratch AS debug
COPY --from=builder /out/cplink-server.debug /out/cplink-agent.debug /out/cplink-operator.debug \
     /out/kubectl-cplink.debug /

# glibc-based and shell-less; `nonroot` is uid/gid 65532, matching the pods' runAsUser. The
# plugin is there to be copied out of the image (`docker create`, then `docker cp`) onto a
# workstation's PATH.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=builder /out/cplink-server /out/cplink-agent /out/cplink-operator /out/kubectl-cplink \
     /usr/local/bin/
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/cplink-operator"]
