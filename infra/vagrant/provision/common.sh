#!/usr/bin/env bash
# Every Node of the Vagrant cluster: containerd, kubeadm/kubelet/kubectl of one Kubernetes
# minor, the kernel settings kubeadm checks, and a kubelet bound to the Node's
# private-network address. Run as root by Vagrant's shell provisioner; safe to run again.
#
# Environment (set by the Vagrantfile): NODE_IP, K8S_MINOR (e.g. 1.30).
set -euo pipefail

: "${NODE_IP:?NODE_IP is not set (the Vagrantfile sets it)}"
: "${K8S_MINOR:?K8S_MINOR is not set (the Vagrantfile sets it from versions.env)}"
export DEBIAN_FRONTEND=noninteractive

readonly KEYRING=/etc/apt/keyrings/kubernetes-apt-keyring.gpg
readonly K8S_REPO="https://pkgs.k8s.io/core:/stable:/v${K8S_MINOR}/deb/"

log() { echo "[common $(hostname)] $*"; }

disable_swap() {
  # The kubelet refuses to start with swap on.
  swapoff -a
  sed -i -E '/^[^#].*\sswap\s/ s/^/#/' /etc/fstab
}

load_kernel_modules() {
  printf '%s\n' overlay br_netfilter >/etc/modules-load.d/kubernetes.conf
  modprobe overlay
  modprobe br_netfilter
}

set_sysctls() {
  cat >/etc/sysctl.d/90-kubernetes.conf <<'EOF'
net.bridge.bridge-nf-call-iptables = 1
net.bridge.bridge-nf-call-ip6tables = 1
net.ipv4.ip_forward = 1
EOF
  sysctl --system >/dev/null
}

install_base_packages() {
  apt-get update -q
  apt-get install -y -q --no-install-recommends apt-transport-https ca-certificates curl gpg \
    containerd
}

configure_containerd() {
  # The kubelet uses the systemd cgroup driver (kubeadm's default): containerd must too.
  mkdir -p /etc/containerd
  if ! grep -q 'SystemdCgroup = true' /etc/containerd/config.toml 2>/dev/null; then
    containerd config default >/etc/containerd/config.toml
    sed -i 's/SystemdCgroup = false/SystemdCgroup = true/' /etc/containerd/config.toml
    systemctl restart containerd
  fi
  systemctl enable --now containerd
  cat >/etc/crictl.yaml <<'EOF'
runtime-endpoint: unix:///run/containerd/containerd.sock
image-endpoint: unix:///run/containerd/containerd.sock
EOF
}

install_kubernetes_packages() {
  # pkgs.k8s.io has one repository per minor: pinning the repository pins the minor.
  install -d -m 755 /etc/apt/keyrings
  curl -fsSL "${K8S_REPO}Release.key" | gpg --dearmor --yes -o "$KEYRING"
  echo "deb [signed-by=${KEYRING}] ${K8S_REPO} /" >/etc/apt/sources.list.d/kubernetes.list
  apt-get update -q
  apt-mark unhold kubelet kubeadm kubectl >/dev/null 2>&1 || true
  apt-get install -y -q kubelet kubeadm kubectl
  apt-mark hold kubelet kubeadm kubectl
}

bind_kubelet_to_node_ip() {
  # Every VM has the same NAT address on its first interface (10.0.2.15 with VirtualBox):
  # the Node's address must be the private network's.
  echo "KUBELET_EXTRA_ARGS=--node-ip=${NODE_IP}" >/etc/default/kubelet
  systemctl daemon-reload
  systemctl enable kubelet
  systemctl restart kubelet
}

main() {
  log "preparing the Node (address ${NODE_IP}, Kubernetes ${K8S_MINOR})"
  disable_swap
  load_kernel_modules
  set_sysctls
  install_base_packages
  configure_containerd
  install_kubernetes_packages
  bind_kubelet_to_node_ip
  log "ready: $(kubeadm version -o short), containerd $(containerd --version | awk '{print $3}')"
}

main "$@"
