#!/usr/bin/env bash
# Local observability stack for VMCP: runs Grafana's all-in-one OpenTelemetry
# backend (grafana/otel-lgtm: collector, Prometheus, Tempo, Loki, Grafana) in a
# Podman container, with the VMCP dashboard from deploy/grafana provisioned.
# VMCP pushes to it with UNKEY_VMCP_OTEL_ENABLED=true and the default
# UNKEY_VMCP_OTEL_ENDPOINT=localhost:4318.
#
# Usage: scripts/o11y.sh start|stop|status
# Environment: VMCP_O11Y_IMAGE (image to run), VMCP_O11Y_NAME (container name),
#              VMCP_O11Y_WAIT (seconds to wait for Grafana, default 120).
set -euo pipefail

IMAGE="${VMCP_O11Y_IMAGE:-docker.io/grafana/otel-lgtm:0.34.0}"
NAME="${VMCP_O11Y_NAME:-vmcp-o11y}"
WAIT="${VMCP_O11Y_WAIT:-120}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
GRAFANA="$ROOT/deploy/grafana"
PROVISIONING=/otel-lgtm/grafana/conf/provisioning/dashboards

die() {
    echo "o11y: $*" >&2
    exit 1
}

need_podman() {
    command -v podman >/dev/null 2>&1 || die "podman is not installed (apt-get install podman)"
}

running() {
    [ "$(podman container inspect --format '{{.State.Running}}' "$NAME" 2>/dev/null || true)" = "true" ]
}

wait_for_grafana() {
    local deadline=$((SECONDS + WAIT))
    until curl -fsS -o /dev/null http://localhost:3000/api/health 2>/dev/null; do
        if ! running; then
            podman logs --tail 30 "$NAME" >&2 || true
            die "container $NAME stopped during start-up"
        fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            die "Grafana did not answer on :3000 within ${WAIT}s (see: podman logs $NAME)"
        fi
        sleep 1
    done
}

start() {
    need_podman
    [ -f "$GRAFANA/provisioning/dashboards/vmcp.yaml" ] || die "missing $GRAFANA/provisioning/dashboards/vmcp.yaml"
    if running; then
        echo "o11y: $NAME is already running"
    else
        podman rm -f "$NAME" >/dev/null 2>&1 || true
        podman run -d --name "$NAME" \
            -p 3000:3000 -p 4317:4317 -p 4318:4318 \
            -v "$GRAFANA/provisioning/dashboards/vmcp.yaml:$PROVISIONING/vmcp.yaml:ro,Z" \
            -v "$GRAFANA/dashboards:/otel-lgtm/vmcp-dashboards:ro,Z" \
            "$IMAGE" >/dev/null
        wait_for_grafana
    fi
    cat <<MSG
o11y: Grafana    http://localhost:3000/d/vmcp-overview  (anonymous admin)
o11y: OTLP/HTTP  localhost:4318   OTLP/gRPC localhost:4317
o11y: run VMCP with UNKEY_VMCP_OTEL_ENABLED=true UNKEY_VMCP_OTEL_ENDPOINT=localhost:4318
MSG
}

stop() {
    need_podman
    if podman container exists "$NAME"; then
        podman rm -f "$NAME" >/dev/null
        echo "o11y: stopped $NAME"
    else
        echo "o11y: $NAME is not running"
    fi
}

status() {
    need_podman
    if running; then
        echo "o11y: $NAME is running"
    else
        echo "o11y: $NAME is not running"
        return 1
    fi
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) die "usage: $0 start|stop|status" ;;
esac
