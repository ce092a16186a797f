"""The node agent: polls conntrack into a connection store and exports flow records."""
