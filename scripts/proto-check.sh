#!/usr/bin/env bash
# Protobuf checks: buf lint and format, buf breaking against `main` (on any other branch),
# and proof that the breaking check bites: on a temporary copy of proto/ with a field
# removed, `buf breaking` against the original must fail and name that field, while adding
# a field must pass.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"
BUF="$ORDERS_CACHE/node/node_modules/.bin/buf"

"$BUF" lint
"$BUF" format -d --exit-code
if git rev-parse -q --verify main >/dev/null && [ "$(git rev-parse HEAD)" != "$(git rev-parse main)" ]; then
  "$BUF" breaking --against '.git#branch=main'
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
copy() { mkdir -p "$work/$1" && cp -r buf.yaml proto "$work/$1/"; }
file=proto/orders/v1/orders.proto
field='  optional string note = 7;'
grep -qxF "$field" "$file" || die "$file no longer has '$field'; pick another field to remove"

copy removed
grep -vxF "$field" "$file" >"$work/removed/$file"
if (cd "$work/removed" && "$BUF" breaking --against "$ROOT" --error-format json) >"$work/removed.out" 2>&1; then
  die "buf breaking accepted a removed field (Order.note): the breaking check does not bite"
fi
if ! grep -q '"type":"FIELD_NO_DELETE"' "$work/removed.out" || ! grep -q 'name \\"note\\"' "$work/removed.out"; then
  cat "$work/removed.out"
  die "buf breaking failed, but not on the removed field"
fi

copy added
sed "s|^$field\$|&\n  // A field added later.\n  optional string added_later = 99;|" "$file" >"$work/added/$file"
grep -q 'added_later = 99' "$work/added/$file" || die "could not add a field to the copy"
(cd "$work/added" && "$BUF" breaking --against "$ROOT") \
  || die "buf breaking refused an added field, which is compatible"
echo "buf breaking: a removed field fails, an added field passes"
