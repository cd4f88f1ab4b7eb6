# The `kiln-node-torch` image: the `kiln` binary with the TorchScript engine (the default
# features), libtorch's lib/ from the pinned torch wheel and the NVIDIA libraries that wheel
# loads (CUDA 13 user-space libraries: the host needs only the driver, through the NVIDIA
# container toolkit). Everything else as the `kiln` image (python3, the worker SDK,
# nats-server, the non-root user).
#
# A GPU host builds it on a CUDA base with glibc >= 2.36 (the binary is built on Debian
# bookworm): `scripts/images.sh --torch --base nvidia/cuda:13.0.1-base-ubuntu24.04`.
ARG BASE=kiln-base:bookworm
FROM ${BASE}

ARG KILN_VERSION=dev
ARG KILN_COMMIT=unknown
LABEL org.opencontainers.image.title="kiln-node-torch" \
      org.opencontainers.image.description="Kiln node with the TorchScript engine (libtorch from the pinned torch wheel)" \
      org.opencontainers.image.version="${KILN_VERSION}" \
      org.opencontainers.image.revision="${KILN_COMMIT}" \
      org.opencontainers.image.licenses="Apache-2.0"

RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 ca-certificates libgomp1 \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin

COPY kiln_worker-*.whl /tmp/wheels/
RUN python3 -m zipfile -e /tmp/wheels/kiln_worker-*.whl "$(python3 -c 'import sysconfig; print(sysconfig.get_path("purelib"))')" \
 && rm -rf /tmp/wheels \
 && python3 -c 'import kiln_worker'

# The wheel's layout is kept (torch/lib beside nvidia/*/lib): libtorch_cuda finds the NVIDIA
# libraries through its own $ORIGIN-relative rpath.
COPY site-packages/ /opt/kiln/site-packages/
ENV LD_LIBRARY_PATH=/opt/kiln/site-packages/torch/lib

COPY kiln nats-server /usr/local/bin/
COPY demo_worker.py /usr/local/share/kiln/workers/demo_worker.py
COPY cluster.toml /etc/kiln/cluster.toml

RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/kiln --create-home --shell /usr/sbin/nologin kiln \
 && mkdir -p /var/lib/kiln/cache /var/lib/kiln/nats /var/lib/kiln/models \
 && chown -R kiln:kiln /var/lib/kiln \
 && kiln --version
USER kiln
WORKDIR /var/lib/kiln
ENV KILN_CONFIG=/etc/kiln/cluster.toml \
    KILN_CACHE=/var/lib/kiln/cache \
    KILN_NATS_SERVER=/usr/local/bin/nats-server

EXPOSE 8080 9464
ENTRYPOINT ["kiln"]
CMD ["node"]
