#!/bin/sh
# The long random fuzz run of `resalign validate` and `grid --render` (tests/test_spec_fuzz.py:
# mutated shipped specs and templates must end in exit 0 or 2, never a traceback, a hang or a
# memory blow-up), and its record: one line appended to docs/fuzz.md with the counts.
#
#   scripts/fuzz_specs.sh [SPECS]      (default 1000 specs; templates: a quarter as many)
#   make fuzz FUZZ_EXAMPLES=5000
#
# Random (RESALIGN_FUZZ_RANDOM=1): each run draws new examples; CI runs a fixed, derandomized
# 200 specs and 50 templates.
set -u
N=${1:-1000}
PY=${PYTHON:-.venv/bin/python}
cd "$(dirname "$0")/.."
start=$(date +%s)
load=$(cut -d' ' -f1 /proc/loadavg 2>/dev/null || echo "?")
out=$(RESALIGN_FUZZ_EXAMPLES=$N RESALIGN_FUZZ_RANDOM=1 nice -n 10 "$PY" -m pytest -q -p no:xdist \
      -p no:cacheprovider -s tests/test_spec_fuzz.py 2>&1)
rc=$?
secs=$(( $(date +%s) - start ))
specs=$(printf '%s\n' "$out" | sed -n 's/^.*fuzz: \([0-9]*\) validations: \([0-9]*\) valid, \([0-9]*\) exit 2.*$/\1 specs (\2 valid, \3 exit 2)/p' | head -1)
tpls=$(printf '%s\n' "$out" | sed -n 's/^.*template fuzz: \([0-9]*\) rendered, \([0-9]*\) exit 2.*$/\1 rendered, \2 exit 2/p' | head -1)
if [ $rc -eq 0 ]; then verdict="0 failures"; else verdict="FAILED (pytest exit $rc)"; fi
line="| $(date -u +%Y-%m-%d) | $(git rev-parse --short HEAD 2>/dev/null || echo ?) | ${specs:-?} | ${tpls:-?} templates | $verdict | ${secs} s, load ${load} on $(nproc) cores |"
[ -f docs/fuzz.md ] || printf '%s\n' "# Fuzz runs of the spec language" "" \
  "Appended by \`scripts/fuzz_specs.sh\` (\`make fuzz\`); the newest last." "" \
  "| date (UTC) | commit | specs through \`validate\` | templates through \`grid --render\` | result | wall time |" \
  "|---|---|---|---|---|---|" > docs/fuzz.md
printf '%s\n' "$line" >> docs/fuzz.md
printf '%s\n' "$out" | tail -5
echo "recorded in docs/fuzz.md: $line"
exit $rc
