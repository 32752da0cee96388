"""The distributed run: the message contracts, the artifact store, the metrics and their readers,
and the steps each service calls. No bus client here either: services/ connects these to one."""
