#!/usr/bin/env bash
# Brings up the Vagrant cluster (see Vagrantfile): `vagrant up --provision`, then writes
# ssh-config (`vagrant ssh-config`), which push_antrea.sh uses to reach the Nodes.
set -euo pipefail

readonly PROG=provision.sh
readonly USAGE="usage: ${PROG} [-l|--large] [-h|--help]"
THIS_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
readonly THIS_DIR
readonly NETWORK=192.168.77.0/24

die() {
  echo "${PROG}: $*" >&2
  exit 1
}

usage_error() {
  echo "${PROG}: $*; ${USAGE}" >&2
  exit 2
}

print_help() {
  cat <<EOF
${USAGE}

Brings up a Kubernetes cluster of three VirtualBox VMs (box ubuntu/jammy64): the
control-plane Node k8s-node-control-plane (192.168.77.100) and the workers
k8s-node-worker-1 (.101) and k8s-node-worker-2 (.102), with Antrea as the CNI.
Then writes ${THIS_DIR}/ssh-config for push_antrea.sh.

  -l, --large   4096 MB per VM instead of 2048 (K8S_NODE_LARGE=true): needed by the ELK
                flow collector (push_antrea.sh --flow-collector ELK)
  -h, --help    this help

Versions are in versions.env. Another provider: VAGRANT_DEFAULT_PROVIDER=libvirt (with the
vagrant-libvirt plugin).
EOF
}

parse_args() {
  K8S_NODE_LARGE=false
  while (($# > 0)); do
    case $1 in
      -l | --large) K8S_NODE_LARGE=true ;;
      -h | --help)
        print_help
        exit 0
        ;;
      -*) usage_error "unknown flag '$1'" ;;
      *) usage_error "unexpected argument '$1'" ;;
    esac
    shift
  done
  export K8S_NODE_LARGE
}

# VirtualBox (6.1.28 and later) only gives host-only networks addresses in 192.168.56.0/21
# unless /etc/vbox/networks.conf allows others: say so before `vagrant up` fails on it.
warn_about_virtualbox_networks() {
  local provider=${VAGRANT_DEFAULT_PROVIDER:-virtualbox}
  [[ $provider == virtualbox ]] || return 0
  command -v VBoxManage >/dev/null 2>&1 || return 0
  [[ $(uname -s) == Linux || $(uname -s) == Darwin ]] || return 0
  if ! grep -qs '192\.168\.77\.' /etc/vbox/networks.conf; then
    echo "${PROG}: note: if VirtualBox refuses the host-only network ${NETWORK}, allow it:" \
      "echo '* ${NETWORK}' | sudo tee -a /etc/vbox/networks.conf" >&2
  fi
}

write_ssh_config() {
  vagrant ssh-config >ssh-config.tmp
  mv -f ssh-config.tmp ssh-config
}

print_next_steps() {
  cat <<EOF

The cluster is up. Its kubeconfig: ${THIS_DIR}/kube/config
  export KUBECONFIG=${THIS_DIR}/kube/config && kubectl get nodes -o wide
or on the control plane:
  (cd ${THIS_DIR} && vagrant ssh k8s-node-control-plane -c 'kubectl get nodes -o wide')
Next, deploy the flow aggregator and a collector, e.g.:
  ${THIS_DIR}/push_antrea.sh --flow-collector ELK     (after provision.sh --large)
  ${THIS_DIR}/push_antrea.sh --clickhouse
EOF
}

main() {
  parse_args "$@"
  command -v vagrant >/dev/null 2>&1 ||
    die "vagrant is not on PATH: install Vagrant and VirtualBox (or libvirt) first"
  cd "$THIS_DIR"
  warn_about_virtualbox_networks
  echo "bringing up the cluster (K8S_NODE_LARGE=${K8S_NODE_LARGE})"
  vagrant up --provision
  write_ssh_config
  print_next_steps
}

main "$@"
