"""RFC 7011 IPFIX: information elements, templates, messages, exporting and collecting processes."""
