#!/usr/bin/env bash
# Deploys antrea-flow's flow aggregator on the Vagrant cluster (provision.sh), optionally
# with a collector, and turns on the flow exporter of Antrea's agents:
#   1. builds the flow aggregator's image and imports it on every Node (no registry);
#   2. deploys the collectors asked for: ELK (build/yamls/elk-flow-collector/) and/or
#      ClickHouse + Grafana (build/yamls/flow-visibility/);
#   3. applies build/yamls/flow-aggregator.yml with flow-aggregator.conf pointed at them;
#   4. edits antrea-agent.conf in kube-system/antrea-config (FlowExporter gate, flowExporter
#      section) and restarts the antrea-agent Pods, which then export to the aggregator.
# kubectl runs on the control-plane Node over ssh (ssh-config, written by provision.sh).
# --dry-run runs nothing and needs neither ssh-config nor a cluster: it prints every command
# and every manifest in full, as a real run would apply it.
set -euo pipefail

readonly PROG=push_antrea.sh
readonly USAGE="usage: ${PROG} [--flow-collector ELK|<HOST>:<PORT>[:tcp|udp]] [--clickhouse] [--dry-run] [-h|--help]"
readonly COLLECTOR_FORM="ELK or <HOST>:<PORT>[:tcp|udp] (e.g. 10.0.0.5:4739:tcp)"

THIS_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$THIS_DIR/../.." && pwd)
readonly THIS_DIR REPO_ROOT
readonly SSH_CONFIG=$THIS_DIR/ssh-config
readonly PATCHER=$THIS_DIR/patch_config.py
readonly VERSIONS_FILE=$THIS_DIR/versions.env
readonly STAND_IN_ANTREA_CONFIG=$THIS_DIR/dry-run-antrea-config.yml

readonly CONTROL_PLANE=k8s-node-control-plane
readonly CONTROL_PLANE_IP=192.168.77.100
# The Vagrantfile's machines, for --dry-run without ssh-config.
readonly VAGRANTFILE_NODES=(k8s-node-control-plane k8s-node-worker-1 k8s-node-worker-2)

# Fully qualified, so that podman (which would prefix localhost/) and containerd agree with
# the Deployment's antrea-flow/flow-aggregator:latest.
readonly IMAGE=docker.io/antrea-flow/flow-aggregator:latest
readonly IMAGE_TAR_ON_NODE=/tmp/antrea-flow-flow-aggregator.tar

readonly FA_MANIFEST=build/yamls/flow-aggregator.yml
readonly ELK_MANIFEST=build/yamls/elk-flow-collector/elk-flow-collector.yml
readonly FLOW_VISIBILITY_MANIFEST=build/yamls/flow-visibility/flow-visibility.yml
readonly ELK_NAMESPACE=elk-flow-collector
readonly FLOW_VISIBILITY_NAMESPACE=flow-visibility
readonly CLICKHOUSE_URL=http://clickhouse-clickhouse.flow-visibility.svc:8123
readonly LOGSTASH_PLACEHOLDER=LOGSTASH_CLUSTER_IP
readonly KIBANA_URL=http://${CONTROL_PLANE_IP}:30007
readonly GRAFANA_URL=http://${CONTROL_PLANE_IP}:30008

readonly ROLLOUT_TIMEOUT=300s
readonly COLLECTOR_TIMEOUT=600s

FLOW_COLLECTOR=""
CLICKHOUSE=false
DRY_RUN=false
PYTHON=""
WORK_DIR=""
NODES=()

# --- messages --------------------------------------------------------------------------

die() {
  echo "${PROG}: $*" >&2
  exit 1
}

usage_error() {
  echo "${PROG}: $*; ${USAGE}" >&2
  exit 2
}

warn() { echo "${PROG}: warning: $*" >&2; }

say() { echo "==> $*"; }

print_help() {
  cat <<EOF
${USAGE}

Deploys antrea-flow's flow aggregator on the Vagrant cluster made by provision.sh and turns
on the flow exporter of Antrea's agents (kube-system/antrea-config), which then send their
records to it over mutual TLS.

  --flow-collector ELK       also deploy the ELK flow collector (namespace elk-flow-collector;
                             needs provision.sh --large) and export to its Logstash over UDP;
                             Kibana: ${KIBANA_URL}
  --flow-collector HOST:PORT[:tcp|udp]
                             export the aggregated records to this IPFIX collector (tcp by
                             default)
  --clickhouse               also deploy ClickHouse and Grafana (namespace flow-visibility)
                             and write the records to ClickHouse; Grafana: ${GRAFANA_URL}
  --dry-run                  run nothing: print every command and every manifest in full
  -h, --help                 this help

Needs ssh-config (written by provision.sh), docker or podman, and python3 with PyYAML (the
repository's .venv from \`make setup\` is used when it exists).
EOF
}

# --- arguments -------------------------------------------------------------------------

# <HOST>:<PORT>[:tcp|udp], HOST an IPv4 address, an IPv6 address in brackets or a DNS name.
valid_collector_address() {
  local rest=$1 host port octet
  local ipv4='^([0-9]{1,3}\.){3}[0-9]{1,3}$'
  local ipv6='^\[[0-9A-Fa-f:.]+\]$'
  local label='[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?'
  local name="^${label}(\.${label})*$"
  [[ $rest == *:tcp || $rest == *:udp ]] && rest=${rest%:*}
  [[ $rest == *:* ]] || return 1
  host=${rest%:*}
  port=${rest##*:}
  [[ $port =~ ^[0-9]{1,5}$ ]] || return 1
  ((10#$port >= 1 && 10#$port <= 65535)) || return 1
  if [[ $host =~ $ipv4 ]]; then
    for octet in ${host//./ }; do
      ((10#$octet <= 255)) || return 1
    done
  elif [[ $host =~ $ipv6 ]]; then
    return 0
  elif [[ $host =~ ^[0-9.]+$ || ! $host =~ $name ]]; then
    return 1 # a broken IPv4 address (10.0.0) or not a name
  fi
}

set_flow_collector() {
  local flag=$1 value=$2
  [[ -z $FLOW_COLLECTOR ]] || usage_error "${flag} given twice"
  if [[ ${value^^} == ELK ]]; then
    FLOW_COLLECTOR=ELK
  elif valid_collector_address "$value"; then
    FLOW_COLLECTOR=$value
  else
    usage_error "${flag} '${value}' is not valid: expected ${COLLECTOR_FORM}"
  fi
}

parse_args() {
  while (($# > 0)); do
    case $1 in
      --flow-collector | -fc)
        if (($# < 2)) || [[ -z $2 || $2 == -* ]]; then
          usage_error "$1 needs a value: ${COLLECTOR_FORM}"
        fi
        set_flow_collector "$1" "$2"
        shift
        ;;
      --flow-collector=*) set_flow_collector --flow-collector "${1#*=}" ;;
      --clickhouse) CLICKHOUSE=true ;;
      --dry-run) DRY_RUN=true ;;
      -h | --help)
        print_help
        exit 0
        ;;
      -*) usage_error "unknown flag '$1'" ;;
      *) usage_error "unexpected argument '$1'" ;;
    esac
    shift
  done
}

# --- running, or printing in a dry run -------------------------------------------------

# The arguments as a shell would need them typed: plain words as they are, others in single
# quotes (also what the remote shell parses when the command goes over ssh).
quoted() {
  local -a words=()
  local arg
  for arg in "$@"; do
    if [[ $arg =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
      words+=("$arg")
    else
      words+=("'${arg//\'/\'\\\'\'}'")
    fi
  done
  echo "${words[*]}"
}

dry_run() { [[ $DRY_RUN == true ]]; }

# A command on this machine.
run() {
  echo "+ $(quoted "$@")"
  dry_run || "$@"
}

# A command on a Node, over ssh.
on_node() {
  local node=$1
  shift
  if dry_run; then
    echo "+ [${node}] $(quoted "$@")"
    return 0
  fi
  ssh -F "$SSH_CONFIG" "$node" -- "$(quoted "$@")"
}

# kubectl on the control plane (its /home/vagrant/.kube/config).
kube() { on_node "$CONTROL_PLANE" kubectl "$@"; }

# kubectl whose output is used: runs silently, never in a dry run.
kube_query() { ssh -F "$SSH_CONFIG" "$CONTROL_PLANE" -- "$(quoted kubectl "$@")"; }

print_manifest() {
  local label=$1 file=$2
  echo "#### begin manifest: ${label}"
  cat "$file"
  [[ -z $(tail -c 1 "$file") ]] || echo
  echo "#### end manifest: ${label}"
}

# `kubectl <verb> -f -` with the manifest on standard input; a dry run prints the manifest.
send_manifest() {
  local verb=$1 label=$2 file=$3
  if dry_run; then
    echo "+ [${CONTROL_PLANE}] kubectl ${verb} -f - < (the manifest '${label}' below)"
    print_manifest "$label" "$file"
    return 0
  fi
  kube "$verb" -f - <"$file"
}

# Manifests that may hold CustomResourceDefinitions and their objects together: the objects
# are refused until the definitions are established, so apply again once they are.
send_collector_manifest() {
  local label=$1 file=$2
  if dry_run; then
    send_manifest apply "$label" "$file"
    echo "# (if the apply fails because a CustomResourceDefinition is not established yet:)"
    kube wait --for=condition=established crd --all --timeout=60s
    echo "# (and apply the same manifest again)"
    return 0
  fi
  if ! send_manifest apply "$label" "$file"; then
    say "applying ${label} again once its CustomResourceDefinitions are established"
    kube wait --for=condition=established crd --all --timeout=60s
    send_manifest apply "$label" "$file"
  fi
}

# Waits for every Deployment, StatefulSet and DaemonSet in a namespace.
wait_for_rollouts() {
  local namespace=$1 timeout=$2 workload
  say "waiting for the workloads in namespace ${namespace} to be ready (up to ${timeout} each)"
  if dry_run; then
    echo "+ [${CONTROL_PLANE}] kubectl -n ${namespace} rollout status" \
      "<each Deployment, StatefulSet and DaemonSet of: kubectl -n ${namespace} get deployments,statefulsets,daemonsets -o name> --timeout=${timeout}"
    return 0
  fi
  local workloads
  workloads=$(kube_query -n "$namespace" get deployments,statefulsets,daemonsets -o name) || return 1
  for workload in $workloads; do
    kube -n "$namespace" rollout status "$workload" --timeout="$timeout" || return 1
  done
}

# --- set-up ----------------------------------------------------------------------------

cleanup() {
  if [[ -n $WORK_DIR ]]; then
    rm -rf "$WORK_DIR"
  fi
}

find_python() {
  if [[ -x $REPO_ROOT/.venv/bin/python ]]; then
    PYTHON=$REPO_ROOT/.venv/bin/python
  elif command -v python3 >/dev/null 2>&1; then
    PYTHON=python3
  else
    die "python3 is not on PATH (needed to edit the configs): run \`make setup\` or install python3"
  fi
  "$PYTHON" -c 'import yaml' 2>/dev/null ||
    die "${PYTHON} has no PyYAML: run \`make setup\` (creates .venv) or apt-get install python3-yaml"
}

check_manifests() {
  local manifest
  local -a needed=("$FA_MANIFEST")
  [[ $FLOW_COLLECTOR != ELK ]] || needed+=("$ELK_MANIFEST")
  [[ $CLICKHOUSE != true ]] || needed+=("$FLOW_VISIBILITY_MANIFEST")
  for manifest in "${needed[@]}"; do
    [[ -f $REPO_ROOT/$manifest ]] || die "${REPO_ROOT}/${manifest} not found"
  done
}

read_nodes() {
  if [[ -f $SSH_CONFIG ]]; then
    mapfile -t NODES < <(awk '$1 == "Host" && $2 ~ /^k8s-node-/ { print $2 }' "$SSH_CONFIG")
    ((${#NODES[@]} > 0)) || die "no 'Host k8s-node-...' entries in ${SSH_CONFIG}: run ./provision.sh again"
  elif dry_run; then
    NODES=("${VAGRANTFILE_NODES[@]}")
    echo "# Nodes: ${NODES[*]} (the Vagrantfile's; no ${SSH_CONFIG} yet)"
    return 0
  else
    die "${SSH_CONFIG} not found: run ${THIS_DIR}/provision.sh first (it writes it)"
  fi
  echo "# Nodes: ${NODES[*]} (from ${SSH_CONFIG})"
}

container_tool() {
  if command -v docker >/dev/null 2>&1; then
    echo docker
  elif command -v podman >/dev/null 2>&1; then
    echo podman
  else
    return 1
  fi
}

# --- steps -----------------------------------------------------------------------------

# Copies the image's archive to a Node and imports it where the kubelet's containerd looks.
import_image_on_node() {
  local node=$1 tar=$2
  run scp -F "$SSH_CONFIG" -q "$tar" "${node}:${IMAGE_TAR_ON_NODE}"
  on_node "$node" sudo ctr -n=k8s.io image import "$IMAGE_TAR_ON_NODE"
  on_node "$node" rm -f "$IMAGE_TAR_ON_NODE"
}

push_image() {
  local tool node tar=$WORK_DIR/flow-aggregator.tar failed=()
  local -A pids=()
  say "building the flow aggregator's image ${IMAGE} and importing it on every Node"
  if ! tool=$(container_tool); then
    dry_run || die "neither docker nor podman is on PATH: one is needed to build ${IMAGE}"
    tool=docker
    echo "# (neither docker nor podman is on PATH here: a real run needs one)"
  fi
  # From the repository's root: the Dockerfile copies setup.cfg, antrea_flow/, aggregator/.
  echo "+ cd $(quoted "$REPO_ROOT")"
  dry_run || cd "$REPO_ROOT"
  run "$tool" build -f aggregator/Dockerfile -t "$IMAGE" .
  run "$tool" save -o "$tar" "$IMAGE"
  if dry_run; then
    for node in "${NODES[@]}"; do
      import_image_on_node "$node" "$tar"
    done
    return 0
  fi
  # One Node at a time would take minutes: in parallel, each with its own log.
  for node in "${NODES[@]}"; do
    import_image_on_node "$node" "$tar" >"$WORK_DIR/import-${node}.log" 2>&1 &
    pids[$node]=$!
  done
  for node in "${NODES[@]}"; do
    if wait "${pids[$node]}"; then
      echo "imported on ${node}"
    else
      failed+=("$node")
      sed "s/^/[${node}] /" "$WORK_DIR/import-${node}.log" >&2
    fi
  done
  ((${#failed[@]} == 0)) || die "importing the image failed on: ${failed[*]}"
}

# Sets LOGSTASH_ADDRESS.
deploy_elk() {
  local ip="" waited=0
  say "deploying the ELK flow collector (namespace ${ELK_NAMESPACE})"
  send_collector_manifest "$ELK_MANIFEST" "$REPO_ROOT/$ELK_MANIFEST"
  say "reading the Logstash Service's ClusterIP"
  if dry_run; then
    kube -n "$ELK_NAMESPACE" get svc logstash -o 'jsonpath={.spec.clusterIP}'
    ip=$LOGSTASH_PLACEHOLDER
    echo "# DRY RUN PLACEHOLDER: there is no cluster, so the Logstash address below is" \
      "${LOGSTASH_PLACEHOLDER}:4739:udp; a real run puts the Service's ClusterIP there"
  else
    until [[ $ip =~ ^[0-9a-fA-F.:]+$ ]]; do
      ((waited < 60)) || die "Service ${ELK_NAMESPACE}/logstash has no ClusterIP after 60s"
      ip=$(kube_query -n "$ELK_NAMESPACE" get svc logstash -o 'jsonpath={.spec.clusterIP}' || true)
      [[ $ip =~ ^[0-9a-fA-F.:]+$ ]] || sleep 2
      waited=$((waited + 2))
    done
    [[ $ip != *:* ]] || ip="[${ip}]"
    echo "Logstash: ${ip}"
  fi
  # Logstash's netflow codec listens for IPFIX over UDP (as upstream's ELK collector).
  LOGSTASH_ADDRESS="${ip}:4739:udp"
  # Records exported over UDP before Logstash listens are lost: wait for it (Elasticsearch
  # takes minutes to start on these VMs).
  wait_for_rollouts "$ELK_NAMESPACE" "$COLLECTOR_TIMEOUT" ||
    warn "the ELK flow collector is not ready yet; the flow aggregator exports anyway (records sent before Logstash listens are lost)"
}

deploy_flow_visibility() {
  say "deploying ClickHouse and Grafana (namespace ${FLOW_VISIBILITY_NAMESPACE})"
  send_collector_manifest "$FLOW_VISIBILITY_MANIFEST" "$REPO_ROOT/$FLOW_VISIBILITY_MANIFEST"
  wait_for_rollouts "$FLOW_VISIBILITY_NAMESPACE" "$COLLECTOR_TIMEOUT" ||
    warn "ClickHouse or Grafana is not ready yet; the flow aggregator holds its rows and retries until ClickHouse answers"
}

deploy_flow_aggregator() {
  local collector_address=$1 patched=$WORK_DIR/flow-aggregator.yml existed=false
  local -a patch=(aggregator-manifest "$REPO_ROOT/$FA_MANIFEST") changes=()
  if [[ -n $collector_address ]]; then
    patch+=(--flow-collector "$collector_address")
    changes+=("flowCollector: ${collector_address}")
  fi
  if [[ $CLICKHOUSE == true ]]; then
    patch+=(--clickhouse-url "$CLICKHOUSE_URL")
    changes+=("clickHouse: ${CLICKHOUSE_URL}")
  fi
  local label="${FA_MANIFEST} (flow-aggregator.conf: ${changes[*]:-unchanged})"
  if dry_run && [[ $collector_address == "${LOGSTASH_PLACEHOLDER}:"* ]]; then
    label+=" with the DRY RUN PLACEHOLDER ${LOGSTASH_PLACEHOLDER}"
  fi
  say "deploying the flow aggregator (namespace flow-aggregator)"
  "$PYTHON" "$PATCHER" "${patch[@]}" >"$patched"
  if ! dry_run && kube_query -n flow-aggregator get deployment flow-aggregator >/dev/null 2>&1; then
    existed=true
  fi
  send_manifest apply "$label" "$patched"
  if dry_run; then
    echo "# (only when the flow aggregator was already deployed, for the new image and config:)"
  fi
  if dry_run || [[ $existed == true ]]; then
    kube -n flow-aggregator rollout restart deployment/flow-aggregator
  fi
  # The agents restarted next fetch the CA and client certificate the aggregator publishes.
  say "waiting for the flow aggregator to be ready (up to ${ROLLOUT_TIMEOUT})"
  kube -n flow-aggregator rollout status deployment/flow-aggregator --timeout="$ROLLOUT_TIMEOUT"
}

antrea_version() {
  local image
  image=$(kube_query -n kube-system get daemonset antrea-agent \
    -o 'jsonpath={.spec.template.spec.containers[?(@.name=="antrea-agent")].image}') ||
    die "cannot read the antrea-agent DaemonSet in kube-system: is Antrea installed?"
  echo "${image##*:}"
}

enable_antrea_flow_exporter() {
  local current=$WORK_DIR/antrea-config.yml patched=$WORK_DIR/antrea-config.patched.yml
  local version label
  say "turning on the flow exporter of Antrea's agents (kube-system/antrea-config)"
  if dry_run; then
    version=$(sed -n 's/^ANTREA_VERSION=//p' "$VERSIONS_FILE")
    kube -n kube-system get daemonset antrea-agent \
      -o 'jsonpath={.spec.template.spec.containers[?(@.name=="antrea-agent")].image}'
    kube -n kube-system get configmap antrea-config -o yaml
    echo "# DRY RUN STAND-IN: there is no cluster to read antrea-config from; shown edited is" \
      "the stand-in ${STAND_IN_ANTREA_CONFIG#"$REPO_ROOT"/} (Antrea ${version} from versions.env)"
    cp "$STAND_IN_ANTREA_CONFIG" "$current"
    label="kube-system/antrea-config (DRY RUN STAND-IN, edited: FlowExporter on)"
  else
    version=$(antrea_version)
    kube_query -n kube-system get configmap antrea-config -o yaml >"$current"
    label="kube-system/antrea-config (edited: FlowExporter on)"
  fi
  echo "# Antrea ${version}"
  "$PYTHON" "$PATCHER" antrea-config --antrea-version "$version" "$current" >"$patched"
  send_manifest replace "$label" "$patched"
  # antrea-agent.conf is mounted with subPath: the agents read it only when they start.
  kube -n kube-system rollout restart daemonset/antrea-agent
  say "waiting for the antrea-agent Pods to restart (up to ${ROLLOUT_TIMEOUT})"
  kube -n kube-system rollout status daemonset/antrea-agent --timeout="$ROLLOUT_TIMEOUT"
}

print_where_to_look() {
  local kubectl_here="KUBECONFIG=${THIS_DIR}/kube/config kubectl"
  echo
  say "done$(dry_run && echo ' (dry run: nothing was run)')"
  echo "Records reach the flow aggregator from every Node's antrea-agent; its log:"
  echo "  ${kubectl_here} -n flow-aggregator logs deploy/flow-aggregator"
  echo "  (or: cd ${THIS_DIR} && vagrant ssh ${CONTROL_PLANE} -c 'kubectl -n flow-aggregator logs deploy/flow-aggregator')"
  if [[ $FLOW_COLLECTOR == ELK ]]; then
    echo "Kibana: ${KIBANA_URL} (dashboards imported automatically; Elasticsearch takes a few minutes before the first records show)"
  elif [[ -n $FLOW_COLLECTOR ]]; then
    echo "Aggregated records are exported to the IPFIX collector at ${FLOW_COLLECTOR}."
  fi
  if [[ $CLICKHOUSE == true ]]; then
    echo "Grafana: ${GRAFANA_URL} (ClickHouse: ${CLICKHOUSE_URL}, inside the cluster)"
  fi
}

main() {
  parse_args "$@"
  find_python
  check_manifests
  WORK_DIR=$(mktemp -d)
  trap cleanup EXIT
  if dry_run; then
    echo "# ${PROG} --dry-run: nothing below is run. Commands are shown as '+ command' ('+ [node]"
    echo "# command' over ssh on that Node), manifests in full between '#### begin manifest'"
    echo "# and '#### end manifest' lines, exactly as a real run would send them."
  fi
  read_nodes

  push_image
  local collector_address=$FLOW_COLLECTOR
  LOGSTASH_ADDRESS=""
  if [[ $FLOW_COLLECTOR == ELK ]]; then
    deploy_elk
    collector_address=$LOGSTASH_ADDRESS
  fi
  if [[ $CLICKHOUSE == true ]]; then
    deploy_flow_visibility
  fi
  deploy_flow_aggregator "$collector_address"
  enable_antrea_flow_exporter
  print_where_to_look
}

main "$@"
