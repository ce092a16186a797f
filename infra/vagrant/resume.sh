#!/usr/bin/env bash
# Resumes the Vagrant cluster's VMs suspended by suspend.sh (`vagrant resume`).
set -euo pipefail
exec "$(dirname "${BASH_SOURCE[0]}")/vms.sh" resume "$@"
