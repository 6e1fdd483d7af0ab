#!/usr/bin/env bash
# System services the test suite uses for real: a single-node Slurm (slurmctld, slurmd) with munge.
# Idempotent; needs root (CI and the development machines run as root) and Debian's package mirror.
set -euo pipefail
if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "setup_test_services: installing slurmctld, slurmd and munge needs root (apt-get)" >&2
  exit 1
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null
