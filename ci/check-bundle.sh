#!/usr/bin/env bash
# Publication check of a gate export bundle, for any CI system (drop this file into your repo).
#
# Usage:
#   check-bundle.sh BUNDLE_DIR [--index DIR] [--policy NAME|FILE] [--encoder DIR]
#                   [--audit-log FILE | --no-audit] [--out DIR]
#                   [--public-key FILE | --allow-unsigned]
#
# Runs `gate verify-bundle`: manifest checksums, no unlisted file, every sample re-embedded and
# re-decided under the policy (at least as strict as the bundle's), audit-log anchors. Writes
# OUT/report.json and OUT/junit.xml (one test case per check and per sample; default OUT:
# ./gate-publication-check) and prints every failure reason.
#
# Environment:
#   GATE            command that runs gate (default: gate); may include arguments
#   GATE_AUDIT_LOG  the internal audit log, when --audit-log is not given
#   GATE_PUBLIC_KEY the site's public key (gate keys init), when --public-key is not given
#
# A signature is required by default: the bundle's manifest.sig and the audit log's signed
# heads must verify under the site's public key; --allow-unsigned skips that, explicitly.
#
# Exit status is gate's: 0 publishable, 1 a sample does not pass the policy, 2 usage error
# (e.g. a policy looser than the bundle's; also: gate not found, checked first), 3 integrity failure (checksum, unlisted file,
# audit log), 4 internal error. Anything but 0 must block publication.
set -euo pipefail

usage() { sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//' >&2; exit "${1:-2}"; }

[ $# -ge 1 ] || usage
case "$1" in -h|--help) usage 0 ;; esac
bundle=$1; shift
out=gate-publication-check
args=()
public_key=${GATE_PUBLIC_KEY:-}
unsigned=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out) [ $# -ge 2 ] || usage; out=$2; shift 2 ;;
    --index|--policy|--encoder|--audit-log) [ $# -ge 2 ] || usage; args+=("$1" "$2"); shift 2 ;;
    --no-audit) args+=("$1"); shift ;;
    --public-key) [ $# -ge 2 ] || usage; public_key=$2; shift 2 ;;
    --allow-unsigned) unsigned=1; shift ;;
    *) echo "check-bundle: unknown option $1" >&2; usage ;;
  esac
done

read -r -a gate <<< "${GATE:-gate}"
if ! command -v "${gate[0]:-gate}" >/dev/null 2>&1; then
  echo "check-bundle: FAIL $bundle (exit 2; '${gate[0]:-gate}' not found: install gate or set GATE; no report written)" >&2
  exit 2
fi
if [ "$unsigned" -eq 0 ]; then
  if [ -z "$public_key" ]; then
    echo "check-bundle: FAIL $bundle (exit 2; a signature is required: give --public-key FILE or set GATE_PUBLIC_KEY, or --allow-unsigned; no report written)" >&2
    exit 2
  fi
  args+=(--public-key "$public_key")
fi
mkdir -p "$out"
rm -f "$out/report.json" "$out/junit.xml"  # name only what this run wrote
status=0
"${gate[@]}" verify-bundle "$bundle" "${args[@]}" --json "$out/report.json" --junit "$out/junit.xml" || status=$?

written=()
for f in "$out/report.json" "$out/junit.xml"; do [ -f "$f" ] && written+=("$f"); done
if [ ${#written[@]} -gt 0 ]; then
  report="report: $(IFS=,; echo "${written[*]}" | sed 's/,/, /g')"
else
  report="no report written"
fi
if [ "$status" -eq 0 ]; then
  echo "check-bundle: PASS $bundle ($report)"
else
  echo "check-bundle: FAIL $bundle (exit $status; $report)" >&2
fi
exit "$status"
