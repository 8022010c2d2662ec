#!/usr/bin/env bash
# The long form of the move checker: the in-process checker test with many more
# rollbacks and cutovers under write load, then the tests that kill the move's
# driver at every fault point and the directory leader mid-cutover, each run
# several times. CI runs the short form (scripts/test.sh). Exits non-zero if any
# run fails.
#
#   scripts/move-checker.sh              # 20 extra rounds, 3 repetitions
#   ROUNDS=100 REPEAT=10 scripts/move-checker.sh
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
rounds=${ROUNDS:-20}
repeat=${REPEAT:-3}
for i in $(seq 1 "$repeat"); do
    echo "== repetition $i of $repeat: $rounds extra rounds of rollback + cutover"
    SHARDGATE_MOVE_ROUNDS=$rounds cargo nextest run --profile long -p shardgate-tests --test moves \
        --success-output final -E 'test(a_bucket_moves_under_write_load)'
    cargo nextest run --profile long -p shardgate --test move_faults --test move_leader_loss
done
echo "move checker: $repeat repetitions passed"
