# patchbay's container image: built in a Rust image, run from a small Debian one as a user
# without privileges, listening on every interface.
#
#   docker build -t patchbay .
#   docker run -p 8080:8080 -v "$PWD/actions:/etc/patchbay/actions:ro" \
#     -e PATCHBAY_API_URL=http://api:8000 -e PATCHBAY_REDIS_URL=redis://redis:6379 patchbay
#
# `docker run … patchbay worker --queue <name> -- <command>` runs a task worker instead.

FROM rust:1-slim-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin patchbay

FROM debian:bookworm-slim
# CA certificates: for an https:// API and rediss:// with a public certificate.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin patchbay
COPY --from=build /src/target/release/patchbay /usr/local/bin/patchbay
# The repository's example manifests; mount your own over them.
COPY actions /etc/patchbay/actions
ENV PATCHBAY_LISTEN=0.0.0.0:8080 \
    PATCHBAY_ACTIONS=/etc/patchbay/actions
USER 10001:10001
EXPOSE 8080
# SIGTERM drains (in-flight requests finish, clients get 1001); give it the grace period.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/patchbay"]
