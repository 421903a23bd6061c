#!/usr/bin/env bash
# One rank of an MPI pytest run: rank 0 prints, other ranks write test-logs/mpiN-rank-R.log.
rank=${PMI_RANK:-${OMPI_COMM_WORLD_RANK:-0}}
size=${PMI_SIZE:-${OMPI_COMM_WORLD_SIZE:-1}}
if [ "$rank" = 0 ]; then
    exec python -m mpi4py -m pytest "$@"
fi
mkdir -p test-logs
exec python -m mpi4py -m pytest "$@" > "test-logs/mpi$size-rank-$rank.log" 2>&1
