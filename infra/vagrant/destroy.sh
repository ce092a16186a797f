#!/usr/bin/env bash
# Destroys the Vagrant cluster's VMs (`vagrant destroy -f`) and removes what provision.sh
# and the control plane wrote here (ssh-config, kube/).
set -euo pipefail
exec "$(dirname "${BASH_SOURCE[0]}")/vms.sh" destroy "$@"
