#!/usr/bin/env bash
# The whole test suite: serial tests (as root also the SLURM tests on a one-node cluster and the
# multi-node tests on an emulated 2-node cluster, which start and stop their clusters), timing
# tests (retried), then the MPI tests at 2 and 4 ranks.
# Installs what it needs into ./.venv first. Exits non-zero on any failure on any rank.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh "mpich,test" || exit 1
venv=${DISTBP_VENV:-.venv}
if [ "${DISTBP_TEST_TORCH:-0}" = 1 ]; then
    # PyTorch is only a reference the tests compare against, never a dependency of distbp
    # (the filter drops pip's notes about absent local package folders)
    "$venv/bin/python" -m pip install -q torch==2.13.0 2> >(grep -v "is ignored: it is neither" >&2) || exit 1
fi
export PATH="$PWD/$venv/bin:$PATH"
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
mkdir -p test-logs
status=0

echo "== serial tests"
python -m pytest -q --timeout=120 --durations=8 -p no:cacheprovider -m "not timing" tests || status=1

# Tests that assert on wall-clock time (a failing rank ends the job within seconds) run
# on their own and are retried, so a machine loaded by other work cannot fail the suite.
echo "== timing tests (up to 3 attempts)"
timing=1
for attempt in 1 2 3; do
    python -m pytest -q --timeout=120 -p no:cacheprovider -m timing tests && { timing=0; break; }
    echo "timing tests failed on attempt $attempt"
done
[ $timing -eq 0 ] || status=1

for n in 2 4; do
    echo "== MPI tests on $n ranks"
    # --oversubscribe is implicit for MPICH; the thread timeout ends a hung rank, and
    # python -m mpi4py turns an uncaught error on one rank into an abort of all.
    timeout 900 mpirun -n "$n" bash scripts/mpi_pytest.sh -q --with-mpi -m mpi \
        --timeout=90 --timeout-method=thread -p no:cacheprovider tests
    rc=$?
    if [ $rc -ne 0 ]; then
        status=1
        echo "MPI tests on $n ranks failed (exit $rc); other ranks' output:"
        tail -n 40 test-logs/mpi"$n"-rank-*.log 2>/dev/null
    fi
done
exit $status
