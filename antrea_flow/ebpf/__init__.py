"""The eBPF counter path: every packet of the Node's Pods counted per flow in the kernel
(bpf/flows.c), evicted into the agent's connection store."""
