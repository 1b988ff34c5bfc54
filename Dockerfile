# syntax=docker/dockerfile:1
# lb as a small, non-root container image.
#
#   docker build -t lb:0.1.0 --build-arg GIT_COMMIT=$(git rev-parse --short=12 HEAD) .
#   docker run --rm -p 8080:8080 -p 9901:9901 -v "$PWD/deploy:/etc/lb:ro" lb:0.1.0
#
# Mount the config's directory (deploy/ holds a config.yaml made for a
# container), not the single file: editors replace the file, and a
# single-file bind mount keeps showing the old one. With the directory
# mounted, edits on the host apply live. The config must listen on 0.0.0.0
# (127.0.0.1 is unreachable from outside the container).
#
# `docker compose up` (docker-compose.yml) runs lb with the example backend,
# built by this file's `backend` stage (`--target backend`).

# --- build -------------------------------------------------------------------
FROM rust:1-slim-bookworm AS build
WORKDIR /src
# .git is not sent (see .dockerignore): the commit comes in as a build arg.
ARG GIT_COMMIT=""
ENV BUILD_LB_COMMIT=${GIT_COMMIT}
COPY Cargo.toml Cargo.lock build.rs ./
COPY src ./src
COPY bench ./bench
COPY examples ./examples
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin lb \
    && install -D -m 0755 target/release/lb /out/lb

# --- the example backend (docker-compose.yml's `backends`) ---------------------
# Not the default target: `docker build .` builds lb alone.
FROM build AS backend-build
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --example backend \
    && install -D -m 0755 target/release/examples/backend /out/backend

FROM gcr.io/distroless/cc-debian12:nonroot AS backend
COPY --from=backend-build /out/backend /usr/local/bin/backend
USER 65532:65532
EXPOSE 9001 9002 9003
ENTRYPOINT ["backend", "--host", "0.0.0.0"]
CMD ["9001", "9002", "9003"]

# --- run ---------------------------------------------------------------------
# distroless/cc: glibc and libgcc (lb links them), no shell, no package
# manager; the :nonroot tag runs as uid/gid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/lb /usr/local/bin/lb
USER 65532:65532
# 8080: the proxy; 9901: the admin listener (when the config sets admin:).
EXPOSE 8080 9901
ENTRYPOINT ["lb"]
CMD ["--config", "/etc/lb/config.yaml"]
