#!/usr/bin/env bash
# What `make test` runs: the whole suite (not `-m slow`) as two pytest processes at once.
#
# The networked tests start a real federation (Flower's SuperLink, SuperNodes and a ClientApp
# process per message) and spend most of their five minutes waiting on Flower's fixed polling:
# measured alone on the 2-core machine, 297 s of wall time for 160 s of CPU. Run one after the
# other, that wait added about five minutes to a suite that otherwise keeps both cores busy. So they
# run in a second pytest beside the rest, which runs at a lower priority (nice 10) so that the
# federation's processes get the CPU when they need it and their round timeouts keep their margin.
# Exit status: the first failure of the two runs; 0 when both pass.
set -uo pipefail
python=${1:?usage: tests/run.sh PYTHON}
log=$(mktemp "${TMPDIR:-/tmp}/fedrec-network-tests.XXXXXX")
"$python" -m pytest -q -p no:cacheprovider -m "network and not slow" >"$log" 2>&1 &
network=$!
# If this script is stopped early, the federation's pytest is interrupted as Ctrl-C would (SIGINT),
# so that its fixture stops the coordinator and nodes it started.
trap 'kill -INT "$network" 2>/dev/null; rm -f "$log"' EXIT
nice -n 10 "$python" -m pytest -q -m "not network and not slow"
rest=$?
wait "$network"
net=$?
echo
echo "---- networked tests (marker network), run beside the others ----"
cat "$log"
# 5 is pytest's "no tests collected" (say, a -k in PYTEST_ADDOPTS that selects none in one run)
for status in "$rest" "$net"; do
    if [ "$status" -ne 0 ] && [ "$status" -ne 5 ]; then
        exit "$status"
    fi
done
[ "$rest" -eq 5 ] && [ "$net" -eq 5 ] && exit 5
exit 0
