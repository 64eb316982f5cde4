#!/usr/bin/env bash
# Rebuild the small English Stanza models the tests (and offline users) run.
#
# Trains a POS tagger and a dependency parser with Stanza's own training entry
# points on the UD English EWT *dev* file and scores them on the EWT *test* file.
# The final model is kept (the test file is evaluated once, at the last step, so
# it never selects a checkpoint).  One thread per trainer: with the default
# thread settings the trainers spin in system time on small machines.
#
#   tests/stanza_models/build_models.sh [UD_DIR]       (default tests/data/ud_english_ewt)
#   TAGGER_STEPS=5000 PARSER_STEPS=500 tests/stanza_models/build_models.sh
#
# SKIP_TRAIN=1 re-scores models already trained in $WORK.
# Writes en_ewt_tagger_small.pt, en_ewt_parser_small.pt and scores.json beside
# this script; logs and predictions go to $WORK (default a temporary folder).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
UD="${1:-$HERE/../data/ud_english_ewt}"
TRAIN="$UD/en_ewt-ud-dev.conllu"
TEST="$UD/en_ewt-ud-test.conllu"
WORK="${WORK:-$(mktemp -d /tmp/defrag-stanza-models.XXXXXX)}"
TAGGER_STEPS="${TAGGER_STEPS:-5000}"
PARSER_STEPS="${PARSER_STEPS:-500}"
SEED="${SEED:-1234}"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1   # torch reads these for its intra-op pool

for f in "$TRAIN" "$TEST"; do
  [[ -f "$f" ]] || { echo "missing $f: pass the UD English EWT folder as the first argument" >&2; exit 1; }
done
mkdir -p "$WORK"
echo "work folder: $WORK"

COMMON=(--lang en --shorthand en_ewt --no_pretrain --no_char --cpu --seed "$SEED")

if [[ "${SKIP_TRAIN:-0}" != 1 ]]; then

# Tagger: --share_hid gives plain linear XPOS/UFeats classifiers instead of the
# biaffine ones, whose backward dominates CPU time; small batches give many
# cheap updates instead of a few expensive ones.
python -m stanza.models.tagger --mode train "${COMMON[@]}" \
  --train_file "$TRAIN" --eval_file "$TEST" --output_file "$WORK/tagger-test.conllu" \
  --share_hid --tag_emb_dim 0 --hidden_dim 100 --word_emb_dim 50 --deep_biaff_hidden_dim 100 \
  --batch_size 32 --max_steps "$TAGGER_STEPS" --log_step 250 \
  --fix_eval_interval --eval_interval "$TAGGER_STEPS" \
  --save_dir "$WORK" --save_name en_ewt_tagger_small.pt > "$WORK/tagger.log" 2>&1 &
TAGGER_PID=$!

# Parser: trained on gold tags (as Stanza does); scored below on gold and on
# the tagger's predicted tags.
python -m stanza.models.parser --mode train "${COMMON[@]}" \
  --train_file "$TRAIN" --eval_file "$TEST" \
  --hidden_dim 100 --word_emb_dim 50 --tag_emb_dim 20 --deep_biaff_hidden_dim 100 \
  --batch_size 500 --max_steps "$PARSER_STEPS" --log_step 250 \
  --eval_interval "$PARSER_STEPS" --no_checkpoint \
  --save_dir "$WORK" --save_name en_ewt_parser_small.pt > "$WORK/parser.log" 2>&1 &
PARSER_PID=$!

wait "$TAGGER_PID" || { tail -20 "$WORK/tagger.log" >&2; exit 1; }
wait "$PARSER_PID" || { tail -20 "$WORK/parser.log" >&2; exit 1; }
fi

# Full pipeline on the test file: predicted tags, then the parser on them.
python -m stanza.models.tagger --mode predict "${COMMON[@]}" \
  --eval_file "$TEST" --output_file "$WORK/tagger-test.conllu" \
  --save_dir "$WORK" --save_name en_ewt_tagger_small.pt > "$WORK/tagger-predict.log" 2>&1
python -m stanza.models.parser --mode predict "${COMMON[@]}" \
  --eval_file "$WORK/tagger-test.conllu" --output_file "$WORK/parser-test-predtags.conllu" \
  --save_dir "$WORK" --save_name en_ewt_parser_small.pt > "$WORK/parser-predict.log" 2>&1
python -m stanza.models.parser --mode predict "${COMMON[@]}" \
  --eval_file "$TEST" --output_file "$WORK/parser-test-goldtags.conllu" \
  --save_dir "$WORK" --save_name en_ewt_parser_small.pt > "$WORK/parser-predict-gold.log" 2>&1

cp "$WORK/en_ewt_tagger_small.pt" "$WORK/en_ewt_parser_small.pt" "$HERE/"

python - "$TEST" "$WORK" "$HERE/scores.json" "$TAGGER_STEPS" "$PARSER_STEPS" <<'PY'
import json, sys
import stanza
from stanza.models.common.utils import ud_scores
gold, work, out, tsteps, psteps = sys.argv[1:]
def f1(system, keys):
    ev = ud_scores(gold, system)
    return {k: round(100 * ev[k].f1, 2) for k in keys}
scores = {
    "stanza": stanza.__version__,
    "train": "UD_English-EWT en_ewt-ud-dev.conllu", "eval": "UD_English-EWT en_ewt-ud-test.conllu",
    "tagger_steps": int(tsteps), "parser_steps": int(psteps),
    "tagger": f1(f"{work}/tagger-test.conllu", ["UPOS", "XPOS", "UFeats"]),
    "parser_gold_tags": f1(f"{work}/parser-test-goldtags.conllu", ["UAS", "LAS"]),
    "parser_predicted_tags": f1(f"{work}/parser-test-predtags.conllu", ["UAS", "LAS"]),
}
json.dump(scores, open(out, "w"), indent=2)
print(json.dumps(scores, indent=2))
PY
