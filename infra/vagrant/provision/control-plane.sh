#!/usr/bin/env bash
# The control-plane Node: kubeadm init, a kubeconfig for the vagrant user and for the host
# (/vagrant/kube/config, i.e. infra/vagrant/kube/config), the workers' join command
# (/vagrant/kube/join-command) and Antrea as the CNI. Run as root by Vagrant's shell
# provisioner after common.sh; safe to run again (an initialised cluster and an installed
# Antrea are left as they are, so push_antrea.sh's settings survive).
#
# Environment (set by the Vagrantfile): NODE_IP, POD_CIDR, SERVICE_CIDR, ANTREA_MANIFEST_URL.
set -euo pipefail

: "${NODE_IP:?NODE_IP is not set (the Vagrantfile sets it)}"
: "${POD_CIDR:?POD_CIDR is not set (the Vagrantfile sets it)}"
: "${SERVICE_CIDR:?SERVICE_CIDR is not set (the Vagrantfile sets it)}"
: "${ANTREA_MANIFEST_URL:?ANTREA_MANIFEST_URL is not set (the Vagrantfile sets it)}"

readonly SHARED_DIR=/vagrant/kube
readonly ADMIN_CONF=/etc/kubernetes/admin.conf
export KUBECONFIG=$ADMIN_CONF

log() { echo "[control-plane $(hostname)] $*"; }

init_cluster() {
  if [[ -f $ADMIN_CONF ]]; then
    log "the cluster is already initialised"
    return
  fi
  log "kubeadm init (Pods ${POD_CIDR}, Services ${SERVICE_CIDR}, API server ${NODE_IP}:6443)"
  kubeadm init \
    --apiserver-advertise-address="$NODE_IP" \
    --apiserver-cert-extra-sans="$NODE_IP" \
    --pod-network-cidr="$POD_CIDR" \
    --service-cidr="$SERVICE_CIDR" \
    --node-name="$(hostname)"
}

install_kubeconfig_for_vagrant_user() {
  install -d -o vagrant -g vagrant -m 700 /home/vagrant/.kube
  install -o vagrant -g vagrant -m 600 "$ADMIN_CONF" /home/vagrant/.kube/config
}

publish_kubeconfig_and_join_command() {
  # Written beside and then renamed, so a reader never sees half a file.
  mkdir -p "$SHARED_DIR"
  cp "$ADMIN_CONF" "$SHARED_DIR/config.tmp"
  mv -f "$SHARED_DIR/config.tmp" "$SHARED_DIR/config"
  # A fresh token each run: the default one expires after 24 hours.
  kubeadm token create --print-join-command >"$SHARED_DIR/join-command.tmp"
  mv -f "$SHARED_DIR/join-command.tmp" "$SHARED_DIR/join-command"
  log "wrote ${SHARED_DIR}/config and ${SHARED_DIR}/join-command"
}

install_antrea() {
  if kubectl -n kube-system get daemonset antrea-agent >/dev/null 2>&1; then
    log "Antrea is already installed: left as it is"
  else
    log "installing Antrea from ${ANTREA_MANIFEST_URL}"
    kubectl apply -f "$ANTREA_MANIFEST_URL"
  fi
  log "waiting for this Node to be Ready and for antrea-controller (up to 600s each)"
  kubectl wait --for=condition=Ready "node/$(hostname)" --timeout=600s
  kubectl -n kube-system rollout status deployment/antrea-controller --timeout=600s
}

main() {
  init_cluster
  install_kubeconfig_for_vagrant_user
  publish_kubeconfig_and_join_command
  install_antrea
}

main "$@"
