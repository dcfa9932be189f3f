#!/usr/bin/env bash
# helm --post-renderer for the kind tier: points the agent's /sys and /dev host paths at the fake
# trees the fake device plugin lays out on the node (/var/lib/unwedge-fake/{sysfs,dev}). The
# container paths stay /sys and /dev, so the agent runs with its production flags. Only the
# agent DaemonSet mounts these host paths. Reads the rendered manifests on stdin.
exec sed -e 's#^\([[:space:]]*path:[[:space:]]*\)/sys$#\1/var/lib/unwedge-fake/sysfs#' \
         -e 's#^\([[:space:]]*path:[[:space:]]*\)/dev$#\1/var/lib/unwedge-fake/dev#'
