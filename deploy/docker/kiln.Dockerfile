# The `kiln` image: gateway, CLI and a node with the process engine (no libtorch), the pinned
# nats-server, python3 and the Kiln worker SDK. A team's worker image is `FROM kiln:<version>`
# plus its model's packages and its own /etc/kiln/cluster.toml.
#
# Built by scripts/images.sh, which stages the build context (the slim release binary, the
# nats-server of scripts/setup.sh, the SDK's wheel, this folder's cluster.toml and the demo
# worker): `docker build` alone, without that context, has nothing to copy.
ARG BASE=kiln-base:bookworm
FROM ${BASE}

ARG KILN_VERSION=dev
ARG KILN_COMMIT=unknown
LABEL org.opencontainers.image.title="kiln" \
      org.opencontainers.image.description="Kiln: gateway, CLI and process-engine node (no libtorch), nats-server, python3 and the worker SDK" \
      org.opencontainers.image.version="${KILN_VERSION}" \
      org.opencontainers.image.revision="${KILN_COMMIT}" \
      org.opencontainers.image.licenses="Apache-2.0"

# python3 for process-engine workers; ca-certificates for tls:// NATS URLs. No recommends, no
# lists left behind.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 ca-certificates \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin

# The worker SDK is pure Python and standard library only: its wheel is unpacked into the
# system's site-packages (what pip would do), so the image needs no pip.
COPY kiln_worker-*.whl /tmp/wheels/
RUN python3 -m zipfile -e /tmp/wheels/kiln_worker-*.whl "$(python3 -c 'import sysconfig; print(sysconfig.get_path("purelib"))')" \
 && rm -rf /tmp/wheels \
 && python3 -c 'import kiln_worker'

COPY kiln nats-server /usr/local/bin/
COPY demo_worker.py /usr/local/share/kiln/workers/demo_worker.py
COPY cluster.toml /etc/kiln/cluster.toml

# A non-root user; its home holds $KILN_CACHE (a node's scratch) and /var/lib/kiln/nats is the
# store of a nats-server run from this image (mount a volume there).
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/kiln --create-home --shell /usr/sbin/nologin kiln \
 && mkdir -p /var/lib/kiln/cache /var/lib/kiln/nats \
 && chown -R kiln:kiln /var/lib/kiln \
 && kiln --version && nats-server --version
USER kiln
WORKDIR /var/lib/kiln
ENV KILN_CONFIG=/etc/kiln/cluster.toml \
    KILN_CACHE=/var/lib/kiln/cache \
    KILN_NATS_SERVER=/usr/local/bin/nats-server

# The gateway (http.addr) and a node's /metrics, /healthz and /readyz (node.metrics_addr).
EXPOSE 8080 9464
ENTRYPOINT ["kiln"]
CMD ["--help"]
