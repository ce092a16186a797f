#!/usr/bin/env bash
# Suspends the Vagrant cluster's VMs (`vagrant suspend`); resume.sh brings them back.
set -euo pipefail
exec "$(dirname "${BASH_SOURCE[0]}")/vms.sh" suspend "$@"
