#!/usr/bin/env bash
# Checks ops/ (run by `make lint`): the Prometheus rules and their unit tests with promtool, the
# Alertmanager configuration with amtool, the systemd units with `systemd-analyze verify`. The
# units name /opt/lmnh, the install directory of docs/operations.md, "Running it for real"; they are
# verified with this checkout standing in for it.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v promtool >/dev/null 2>&1; then
  echo "ops/check.sh: promtool not found, so the alerting rules cannot be checked: install it" \
       "(Debian/Ubuntu: apt-get install prometheus; .ci/run does)" >&2
  exit 1
fi
promtool check rules ops/prometheus/lmnh-rules.yml
promtool test rules ops/prometheus/lmnh-rules.test.yml
promtool check config --syntax-only ops/prometheus/prometheus.yml
# amtool (the Alertmanager configuration: routes, receivers) comes with Debian's
# prometheus-alertmanager package
if ! command -v amtool >/dev/null 2>&1; then
  echo "ops/check.sh: amtool not found, so the Alertmanager configuration cannot be checked:" \
       "install it (Debian/Ubuntu: apt-get install prometheus-alertmanager; .ci/run does)" >&2
  exit 1
fi
amtool check-config ops/alertmanager/alertmanager.yml
if command -v systemd-analyze >/dev/null 2>&1; then
  units=$(mktemp -d)
  trap 'rm -rf "$units"' EXIT
  for unit in ops/systemd/*.service ops/systemd/*.timer; do
    sed "s#/opt/lmnh#$PWD#g" "$unit" > "$units/$(basename "$unit")"
  done
  # verify exits 0 on unknown keys and bad values: any line it prints is a failure here
  complaints=$(cd "$units" && systemd-analyze verify ./*.service ./*.timer 2>&1) || true
  if [ -n "$complaints" ]; then
    echo "ops/check.sh: systemd-analyze verify found problems in ops/systemd:" >&2
    echo "$complaints" >&2
    exit 1
  fi
  echo "systemd units: verified (systemd-analyze verify)"
else
  echo "ops/check.sh: NOT CHECKED: systemd-analyze not found; the units in ops/systemd were" \
       "not verified" >&2
fi
