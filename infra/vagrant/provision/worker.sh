#!/usr/bin/env bash
# A worker Node: joins the cluster with the join command the control plane wrote to
# /vagrant/kube/join-command. Run as root by Vagrant's shell provisioner after common.sh;
# a Node that has already joined is left as it is.
#
# Environment (set by the Vagrantfile): NODE_IP, CONTROL_PLANE_IP.
set -euo pipefail

: "${NODE_IP:?NODE_IP is not set (the Vagrantfile sets it)}"
: "${CONTROL_PLANE_IP:?CONTROL_PLANE_IP is not set (the Vagrantfile sets it)}"

readonly JOIN_FILE=/vagrant/kube/join-command
readonly WAIT_SECONDS=600

log() { echo "[worker $(hostname)] $*"; }
die() {
  echo "[worker $(hostname)] error: $*" >&2
  exit 1
}

wait_for_join_command() {
  local waited=0
  until [[ -s $JOIN_FILE ]]; do
    ((waited < WAIT_SECONDS)) ||
      die "no ${JOIN_FILE} after ${WAIT_SECONDS}s: the control plane (${CONTROL_PLANE_IP}) writes it; see its provisioning output"
    sleep 5
    waited=$((waited + 5))
  done
}

join_cluster() {
  local -a command
  read -r -a command <"$JOIN_FILE"
  # Only ever run what kubeadm token create --print-join-command writes.
  [[ ${#command[@]} -ge 3 && ${command[0]} == kubeadm && ${command[1]} == join ]] ||
    die "${JOIN_FILE} is not a 'kubeadm join' command: remove it and run ./provision.sh again"
  log "joining the cluster at ${CONTROL_PLANE_IP} (this Node: ${NODE_IP})"
  "${command[@]}"
}

main() {
  if [[ -f /etc/kubernetes/kubelet.conf ]]; then
    log "already joined"
    return
  fi
  wait_for_join_command
  join_cluster
}

main "$@"
