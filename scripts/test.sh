#!/usr/bin/env bash
# The whole test suite: serial tests (as root also the SLURM tests on a one-node cluster and the
# multi-node tests on an emulated 2-node cluster, which start and stop their clusters), timing
# tests (retried), then the MPI tests at 2 and 4 ranks.
# Installs what it needs into ./.venv first. Exits non-zero on any failure on any rank, and ends
# with one verdict line over every phase (saying whether the SLURM tests ran).
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
phases=()

echo "== serial tests"
# -rs lists the reason of every skipped test
python -m pytest -q -rs --timeout=120 --durations=8 -p no:cacheprovider -m "not timing" \
    --junitxml=test-logs/serial.xml tests
rc=$?
[ $rc -eq 0 ] && phases+=("serial passed") || { status=1; phases+=("serial FAILED (exit $rc)"); }

# Whether the SLURM tests ran, from the serial run's report
slurm=$(python - <<'PY'
import xml.etree.ElementTree as ET
try:
    cases = [c for c in ET.parse("test-logs/serial.xml").iter("testcase") if c.get("classname", "").endswith("test_slurm")]
except (OSError, ET.ParseError):
    cases = []
skips = [c.find("skipped").get("message", "") for c in cases if c.find("skipped") is not None]
if not cases:
    print("NOT RUN: no SLURM test was collected")
elif skips:
    print(f"NOT RUN: {len(skips)} of {len(cases)} skipped: {skips[0].removeprefix('Skipped: ')}")
else:
    print(f"{len(cases)} ran")
PY
)
if [[ $slurm == NOT\ RUN* ]]; then
    echo "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"
    echo "!! The SLURM tests did not run. $slurm"
    echo "!! (they need root to start a one-node cluster; DISTBP_REQUIRE_SLURM=1 turns this into a failure)"
    echo "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"
fi

# Tests that assert on wall-clock time (a failing rank ends the job within seconds) run
# on their own and are retried, so a machine loaded by other work cannot fail the suite.
echo "== timing tests (up to 3 attempts)"
timing=1
for attempt in 1 2 3; do
    python -m pytest -q -rs --timeout=120 -p no:cacheprovider -m timing tests && { timing=0; break; }
    echo "timing tests failed on attempt $attempt"
done
[ $timing -eq 0 ] && phases+=("timing passed") || { status=1; phases+=("timing FAILED (3 attempts)"); }

for n in 2 4; do
    echo "== MPI tests on $n ranks"
    # --oversubscribe is implicit for MPICH; the thread timeout ends a hung rank, and
    # python -m mpi4py turns an uncaught error on one rank into an abort of all. The MPI tests
    # that assert on wall-clock time run after the others, retried like the serial timing tests.
    rc=1
    for marks in "mpi and not timing" "mpi and timing"; do
        for attempt in 1 2 3; do
            timeout 900 mpirun -n "$n" bash scripts/mpi_pytest.sh -q -rs --with-mpi -m "$marks" \
                --timeout=90 --timeout-method=thread -p no:cacheprovider tests
            rc=$?
            [ $rc -eq 0 ] || [ $rc -eq 5 ] && { rc=0; break; }  # 5: nothing collected
            [ "$marks" = "mpi and timing" ] || break
            echo "MPI timing tests on $n ranks failed on attempt $attempt"
        done
        [ $rc -eq 0 ] || break
    done
    if [ $rc -ne 0 ]; then
        status=1
        phases+=("MPI $n ranks FAILED (exit $rc)")
        echo "MPI tests on $n ranks failed (exit $rc); other ranks' output:"
        tail -n 40 test-logs/mpi"$n"-rank-*.log 2>/dev/null
    else
        phases+=("MPI $n ranks passed")
    fi
done
verdict=$([ $status -eq 0 ] && echo PASSED || echo FAILED)
summary=$(IFS=";"; echo "${phases[*]}" | sed 's/;/; /g')
echo "== verdict: $verdict ($summary; SLURM $slurm)"
exit $status
