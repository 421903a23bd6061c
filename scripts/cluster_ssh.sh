#!/bin/sh
# A stand-in for ssh that logs in to a node of scripts/cluster.sh's emulated cluster:
#
#   mpiexec -launcher ssh -launcher-exec scripts/cluster_ssh.sh -hosts n1,n2 -ppn 2 -n 4 CMD
#
# Takes ssh's arguments ([options] HOST COMMAND...), drops the options and runs COMMAND through
# a shell on HOST, as ssh does; between real machines, mpiexec's default ssh launcher does this.
while [ $# -gt 0 ]; do
    case $1 in
        -[BbcDEeFIiJLlmOoPpQRSWw]) shift 2 ;;  # options that take a value
        -*) shift ;;
        *) break ;;
    esac
done
[ $# -ge 1 ] || { echo "cluster_ssh: usage: cluster_ssh.sh [ssh options] HOST [COMMAND...]" >&2; exit 255; }
host=$1
shift
exec "$(dirname "$0")/cluster.sh" exec "$host" sh -c "$*"
