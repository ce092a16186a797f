"""Linux conntrack: netlink dumps of one network namespace and zone, and their fast parser."""
