"""The flow aggregator: joins both Nodes' records of each connection and feeds collectors."""
