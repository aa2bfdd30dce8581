#!/usr/bin/env bash
# Prometheus for the Ray dashboard's Metrics view and the distill_* metrics, on the Ray head node.
# Installs Debian's `prometheus` package if it is missing, then serves on 127.0.0.1:9090 (loopback,
# like the dashboard; tunnel it as you tunnel 8265). Start it after `ray start --head` / `distill`.
# Then start the Ray head with RAY_PROMETHEUS_HOST=http://127.0.0.1:9090 (and RAY_GRAFANA_HOST for
# Grafana) so the dashboard embeds the charts, and import monitoring/grafana/distill.json into Grafana.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
if ! command -v prometheus >/dev/null; then
    apt-get update -qq && apt-get install -y -qq prometheus >/dev/null
fi
data="${PROMETHEUS_DATA:-/tmp/ray/prometheus-data}"
mkdir -p "$data"
exec prometheus --config.file="$here/prometheus.yml" --storage.tsdb.path="$data" \
    --web.listen-address=127.0.0.1:9090 "$@"
