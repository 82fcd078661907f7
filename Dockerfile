# Builds both Portcullis binaries as static musl executables and ships each in a distroless, non-root image.
#   docker build --target controller -t portcullis-controller .
#   docker build --target proxy      -t portcullis-proxy .
# (No Docker engine runs in this repository's CI; .ci/run checks that the binaries named below exist.)
FROM rust:1.95-bookworm AS build
RUN rustup target add x86_64-unknown-linux-musl && apt-get update && apt-get install -y --no-install-recommends musl-tools
WORKDIR /src
COPY . .
RUN cargo build --release --locked --target x86_64-unknown-linux-musl \
      -p portcullis-controller -p portcullis-proxy --bin portcullis-controller --bin portcullis-proxy

FROM gcr.io/distroless/static-debian12:nonroot AS controller
COPY --from=build /src/target/x86_64-unknown-linux-musl/release/portcullis-controller /portcullis-controller
USER 65532:65532
ENTRYPOINT ["/portcullis-controller"]

FROM gcr.io/distroless/static-debian12:nonroot AS proxy
COPY --from=build /src/target/x86_64-unknown-linux-musl/release/portcullis-proxy /portcullis-proxy
USER 65532:65532
ENTRYPOINT ["/portcullis-proxy"]
