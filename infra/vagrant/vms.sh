#!/usr/bin/env bash
# What suspend.sh, resume.sh and destroy.sh do: one vagrant command on the cluster's VMs.
#   vms.sh suspend|resume|destroy [-h|--help]
set -euo pipefail

THIS_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
readonly THIS_DIR

action=$1
shift
readonly PROG="${action}.sh"
readonly USAGE="usage: ${PROG} [-h|--help]"
case $action in
  suspend) help="Suspends the cluster's VMs (their state is saved to disk); resume.sh resumes them." ;;
  resume) help="Resumes the cluster's VMs that suspend.sh suspended." ;;
  destroy) help="Destroys the cluster's VMs and removes ssh-config and kube/ (kubeconfig, join command)." ;;
  *)
    echo "vms.sh: unknown action '${action}'; expected suspend, resume or destroy" >&2
    exit 2
    ;;
esac

if (($# > 1)); then
  echo "${PROG}: unexpected argument '$2'; ${USAGE}" >&2
  exit 2
fi
case ${1:-} in
  "") ;;
  -h | --help)
    echo "$USAGE"
    echo "$help"
    exit 0
    ;;
  *)
    echo "${PROG}: unknown argument '$1'; ${USAGE}" >&2
    exit 2
    ;;
esac

cd "$THIS_DIR"
case $action in
  suspend) vagrant suspend ;;
  resume) vagrant resume ;;
  destroy)
    vagrant destroy -f
    rm -rf ssh-config kube
    ;;
esac
