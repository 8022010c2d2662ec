# shardgate: one static-ish binary on a slim Debian.
FROM rust:1-bookworm AS build
RUN apt-get update -qq \
 && apt-get install -y -qq --no-install-recommends libclang-dev protobuf-compiler \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release -p shardgate

FROM debian:bookworm-slim
RUN apt-get update -qq \
 && apt-get install -y -qq --no-install-recommends ca-certificates postgresql-client \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --home /var/lib/shardgate shardgate \
 && mkdir -p /var/lib/shardgate && chown shardgate /var/lib/shardgate
COPY --from=build /src/target/release/shardgate /usr/local/bin/shardgate
USER shardgate
EXPOSE 6432 6433 7001
ENTRYPOINT ["shardgate"]
CMD ["serve", "--config", "/etc/shardgate/shardgate.toml"]
